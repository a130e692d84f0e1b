"""netprof's plugins, installed as the package ``netprof_plugins``: the
built-in notifiers, each an ordinary plugin registered only through the
``netprof.notifiers`` entry points in pyproject.toml, as a third party's would
be; and the pytest plugin ``pytest_overhead`` (the ``pytest11`` entry point),
which imports netprof only when its fixture is used, so that loading it in
every pytest session costs nothing (and does not hide netprof's own imports
from coverage).
"""
