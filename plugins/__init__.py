"""netprof's built-in notifier plugins, installed as the package ``netprof_plugins``.

Each module is an ordinary plugin, registered only through the
``netprof.notifiers`` entry points in pyproject.toml, as a third party's would be.
"""
