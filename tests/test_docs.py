"""The documentation under docs/ checked against the code, so that it cannot drift.

- NETWORK_PROFILING.md: the configuration tables against ``describe_keys()``,
  ``DaemonSettings``, the rule parser and the notifier plugins.
- NETWORK_PROFILING_API.md: every ``curl`` example is sent to a real netprofd
  (reading segments this process records into), and its answer must have the
  status and the top-level keys of the documented answer; every route of
  ``make_app`` is documented, with the parameters the handler really takes.
- All four docs: every ``deploy/...`` path exists, every configuration they
  name or show loads, every ``netprofd``/``netprof`` flag exists in the
  argparse parsers, every API path they mention is a route.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from netprof_core import Direction, ProfilingConfig, Recorder
from netprof_core.config import describe_keys, load_profiling_config
from netprof_daemon.config import DaemonSettings, daemon_config_from_mapping, load_daemon_config
from tests.apps.netprofd import API_KEY, Netprofd, netprofd

if sys.version_info < (3, 11):
    import tomli as tomllib
else:
    import tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDE = DOCS / "NETWORK_PROFILING.md"
API = DOCS / "NETWORK_PROFILING_API.md"
TROUBLESHOOTING = DOCS / "NETWORK_PROFILING_TROUBLESHOOTING.md"
DEPLOYMENT = DOCS / "DEPLOYMENT.md"
ALL_DOCS = (GUIDE, API, TROUBLESHOOTING, DEPLOYMENT)
DOC_BASE_URL = "http://127.0.0.1:9465"
TYPE_NAMES = {"boolean": "bool", "integer": "int", "float": "float", "string": "str"}


# -- Markdown ---------------------------------------------------------------------


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@dataclass
class Section:
    level: int
    title: str
    body: str


def sections(text: str) -> list[Section]:
    """The text cut at every heading (outside fenced code)."""
    found: list[Section] = []
    current = Section(0, "", "")
    lines: list[str] = []
    fenced = False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"(#{1,6}) (.*)", line)
        if heading:
            current.body = "".join(lines)
            found.append(current)
            current, lines = Section(len(heading.group(1)), heading.group(2).strip(), ""), []
        else:
            lines.append(line)
    current.body = "".join(lines)
    found.append(current)
    return found


def section(text: str, title: str) -> Section:
    (match,) = [s for s in sections(text) if s.title == title]
    return match


def tables(body: str) -> list[list[dict[str, str]]]:
    """Every Markdown table of ``body``: rows as {header: cell}, backticks kept."""
    found, block = [], []
    for line in [*body.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if len(block) >= 2:
            rows = [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in block]
            header = rows[0]
            found.append([dict(zip(header, row)) for row in rows[2:]])
        block = []
    return found


def first_table(text: str, title: str) -> list[dict[str, str]]:
    found = tables(section(text, title).body)
    assert found, f"no table under {title!r}"
    return found[0]


def code(cell: str) -> str:
    """The text of a cell that is one code span."""
    match = re.fullmatch(r"`([^`]*)`", cell)
    assert match, f"expected one `code` span, got {cell!r}"
    return match.group(1)


@dataclass
class Block:
    lang: str
    text: str


def code_blocks(text: str) -> list[Block]:
    blocks = []
    for match in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.DOTALL | re.MULTILINE):
        indent = len(match.group(1))
        body = "".join(line[indent:] for line in match.group(3).splitlines(keepends=True))
        blocks.append(Block(match.group(2), body))
    return blocks


def commands(text: str) -> Iterator[str]:
    """Shell commands of the doc: lines of bash/console blocks (continuations
    joined) and inline code spans."""
    for block in code_blocks(text):
        if block.lang in ("bash", "sh", "console", "shell", ""):
            joined = block.text.replace("\\\n", " ")
            for line in joined.splitlines():
                yield line.lstrip("$ ").strip()
    prose = re.sub(r"^( *)```.*?^\1```", "", text, flags=re.DOTALL | re.MULTILINE)
    yield from re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose)


# -- 1. the configuration reference -------------------------------------------------


def _default(cell: str) -> Any:
    """A TOML literal in a code span, or None for a computed default."""
    if not cell.startswith("`"):
        return None
    return tomllib.loads(f"v = {code(cell)}")["v"]


def _check_settings_table(rows: list[dict[str, str]], expected: list[tuple[str, str, Any, bool]]) -> None:
    documented = {code(row["Key"]): row for row in rows}
    assert list(documented) == [name for name, *_ in expected], "keys (and their order) differ from the code"
    for name, kind, default, computed in expected:
        row = documented[name]
        assert TYPE_NAMES.get(row["Type"]) == kind, f"{name}: type {row['Type']!r}, the code says {kind}"
        if computed:
            assert not row["Default"].startswith("`"), f"{name}: a computed default, not {row['Default']}"
            continue
        value = _default(row["Default"])
        assert value == default and type(value) is type(default), (
            f"{name}: default {row['Default']} in the doc, {default!r} in the code"
        )
        assert row["Meaning"], f"{name}: no meaning"


def test_network_profiling_table_matches_describe_keys() -> None:
    rows = first_table(read(GUIDE), "The `network_profiling` table")
    computed = {
        f.name for f in dataclasses.fields(ProfilingConfig) if f.default_factory is not dataclasses.MISSING
    }
    expected = [(name, kind, default, name in computed) for name, kind, default, _ in describe_keys()]
    _check_settings_table(rows, expected)


def test_daemon_table_matches_daemon_settings() -> None:
    rows = first_table(read(GUIDE), "The `daemon` table")
    defaults = DaemonSettings()
    expected = [
        (f.name, str(f.type), getattr(defaults, f.name), f.default_factory is not dataclasses.MISSING)
        for f in dataclasses.fields(DaemonSettings)
    ]
    _check_settings_table(rows, expected)


def test_rules_tables_match_the_rule_parser() -> None:
    from netprof_daemon import rules

    body = section(read(GUIDE), "The `rules` array").body
    fields_table, metrics_table, builtin_table = tables(body)
    assert {code(row["Field"]) for row in fields_table} == set(rules._FIELDS)
    assert [code(row["Metric"]) for row in metrics_table] == [*rules.ROUTE_METRICS, *rules.APP_METRICS]
    builtin = rules.builtin_rules(ProfilingConfig(), overhead_ms=2.0)
    assert [code(row["Rule"]) for row in builtin_table] == [rule.name for rule in builtin]


def _notifier_entry_points() -> dict[str, str]:
    project = tomllib.loads(read(ROOT / "pyproject.toml"))["project"]
    return dict(project["entry-points"]["netprof.notifiers"])


def test_notifiers_table_matches_the_plugins() -> None:
    import importlib

    rows = first_table(read(GUIDE), "The `notifiers` tables")
    documented: dict[str, set[str]] = {}
    for row in rows:
        documented.setdefault(code(row["Plugin"]), set()).add(code(row["Key"]))
    plugins = _notifier_entry_points()
    assert set(documented) == set(plugins)
    for name, module_name in plugins.items():
        module = importlib.import_module(module_name)
        # Each plugin refuses an unknown key first, naming the keys it knows.
        with pytest.raises(ValueError, match="unknown key") as refused:
            module.netprof_configure({"zz_not_a_key": 1})
        known = re.search(r"known: ([^)]*)\)", str(refused.value))
        assert known, str(refused.value)
        assert documented[name] == {key.strip() for key in known.group(1).split(",")}, name


# -- 2. the API reference, against a real daemon -------------------------------------


@dataclass
class Exchange:
    """One documented request and its documented answer."""

    heading: str
    method: str
    url: str
    headers: dict[str, str]
    data: str | None
    status: int
    content_type: str
    body: str


def parse_curl(command: str) -> tuple[str, str, dict[str, str], str | None]:
    tokens = shlex.split(command.replace("\\\n", " "))
    assert tokens[0] == "curl", command
    method, url, data = None, None, None
    headers: dict[str, str] = {}
    args = iter(tokens[1:])
    for token in args:
        if token in ("-X", "--request"):
            method = next(args)
        elif token in ("-H", "--header"):
            name, _, value = next(args).partition(":")
            headers[name.strip()] = value.strip()
        elif token in ("-d", "--data", "--data-raw"):
            data = next(args)
        elif token in ("-o", "--output"):
            next(args)
        elif token in ("-s", "-S", "-sS", "--silent", "--show-error"):
            pass
        elif token.startswith(("http://", "https://")):
            url = token
        else:
            raise AssertionError(f"a curl option the test does not know: {token!r} in {command!r}")
    assert url is not None, command
    return method or ("POST" if data is not None else "GET"), url, headers, data


def parse_http(text: str) -> tuple[int, str, str]:
    head, _, body = text.partition("\n\n")
    status_line, *header_lines = head.splitlines()
    status = int(status_line.split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return status, headers.get("content-type", ""), body


def api_exchanges(text: str) -> list[Exchange]:
    """Each curl block and the http block that follows it, in the doc's order."""
    exchanges = []
    for part in sections(text):
        blocks = code_blocks(part.body)
        for at, block in enumerate(blocks):
            if block.lang != "bash" or "curl" not in block.text:
                continue
            assert at + 1 < len(blocks) and blocks[at + 1].lang == "http", (
                f"{part.title}: a curl example must be followed by its answer in an http block"
            )
            method, url, headers, data = parse_curl(block.text.strip())
            status, content_type, body = parse_http(blocks[at + 1].text)
            exchanges.append(Exchange(part.title, method, url, headers, data, status, content_type, body))
        assert sum(b.lang == "http" for b in blocks) == sum(
            b.lang == "bash" and "curl" in b.text for b in blocks
        ), f"{part.title}: an http answer without its curl request"
    return exchanges


def registered_routes() -> set[tuple[str, str]]:
    from netprof_daemon.api import make_app

    stub = SimpleNamespace(config=SimpleNamespace(daemon=SimpleNamespace(metrics_require_auth=False)))
    app = make_app(stub, None)  # type: ignore[arg-type]
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}


def route_pattern(canonical: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(canonical)))


def endpoint_sections(text: str) -> dict[tuple[str, str], Section]:
    found = {}
    for part in sections(text):
        match = re.fullmatch(r"(GET|POST|PUT|PATCH|DELETE) (/\S*)", part.title)
        if match:
            found[(match.group(1), match.group(2))] = part
    return found


def test_every_route_is_documented() -> None:
    documented = set(endpoint_sections(read(API)))
    assert documented == registered_routes()


def _media(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def _type_names(exposition: str) -> set[str]:
    return set(re.findall(r"^# TYPE (\S+) ", exposition, re.MULTILINE))


def check_answer(exchange: Exchange, response: httpx.Response) -> None:
    where = f"{exchange.method} {exchange.url}"
    assert response.status_code == exchange.status, f"{where}: {response.status_code} {response.text[:500]}"
    media = _media(exchange.content_type)
    assert _media(response.headers.get("content-type", "")) == media, where
    if media == "application/json":
        shown, got = json.loads(exchange.body), response.json()
        assert isinstance(got, type(shown)), where
        if isinstance(shown, dict):
            assert set(got) == set(shown), f"{where}: keys {sorted(got)}, the doc shows {sorted(shown)}"
    elif media == "application/x-ndjson":
        shown_keys = {frozenset(json.loads(line)) for line in exchange.body.splitlines() if line.strip()}
        lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
        assert lines and shown_keys, f"{where}: nothing to compare"
        assert {frozenset(line) for line in lines} == shown_keys, where
    elif media == "text/csv":
        assert response.text.splitlines()[0] == exchange.body.splitlines()[0], where
    elif media == "text/plain":
        missing = _type_names(exchange.body) - _type_names(response.text)
        assert _type_names(exchange.body) and not missing, f"{where}: no metric families {sorted(missing)}"
    else:
        raise AssertionError(f"{where}: no check for {media}")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Netprofd]:
    """netprofd reading two apps this process records into: ``shop`` (inbound
    and outbound traffic, some failing) and ``legacy`` (feature flag off)."""
    tmp = tmp_path_factory.mktemp("docs-api")
    segment_dir = tmp / "segments"
    shop = Recorder(ProfilingConfig(segment_dir=str(segment_dir), app_name="shop"), implementation="python")
    legacy = Recorder(
        ProfilingConfig(segment_dir=str(segment_dir), app_name="legacy", feature_flag_enabled=False),
        implementation="python",
    )
    items = shop.route_id("/items/{item_id}", "GET")
    checkout = shop.route_id("/checkout", "POST")
    payments = shop.route_id("payments.internal", "POST", Direction.OUTBOUND)
    now = time.monotonic_ns()
    for i in range(40):
        shop.record(items, 200, now - 4_000_000 - i * 10_000, now, 0, 512)
    for i in range(10):
        shop.record(checkout, 500 if i < 2 else 201, now - 30_000_000, now, 300, 80)
        shop.record(payments, 200, now - 25_000_000, now, 120, 40)
    legacy.record(legacy.route_id("/", "GET"), 200, now - 1_000_000, now)
    rule = (
        '\n[[rules]]\nname = "CheckoutErrors"\nmetric = "error_rate_percent"\nop = ">"\n'
        'threshold = 5.0\nwindow = "2m"\nfor = "1m"\nseverity = "critical"\napp = "shop"\n'
        'route = "/checkout"\n'
    )
    try:
        with netprofd(tmp, segment_dir, extra=rule) as running:
            running.wait_until(
                lambda: {"shop", "legacy"} <= {a["app"] for a in running.stats(slowest=0)["applications"]},
                what="both apps",
            )
            yield running
    finally:
        shop.close(remove=True)
        legacy.close(remove=True)


def _send(client: httpx.Client, exchange: Exchange, base: str, ids: dict[str, str]) -> httpx.Response:
    assert exchange.url.startswith(DOC_BASE_URL), f"examples use {DOC_BASE_URL}: {exchange.url}"
    url = base + exchange.url[len(DOC_BASE_URL) :]
    for shown, real in ids.items():
        url = url.replace(shown, real)
    headers = {k: v.replace("$NETPROF_API_KEY", API_KEY) for k, v in exchange.headers.items()}
    return client.request(exchange.method, url, headers=headers, content=exchange.data)


def test_every_documented_request_answers_as_documented(daemon: Netprofd) -> None:
    text = read(API)
    exchanges = api_exchanges(text)
    routes = registered_routes()
    ran_ok: set[tuple[str, str]] = set()
    ids: dict[str, str] = {}  # an id shown in the doc -> the one the daemon made
    with httpx.Client(timeout=20) as client:
        for exchange in exchanges:
            response = _send(client, exchange, daemon.url, ids)
            check_answer(exchange, response)
            if _media(exchange.content_type) == "application/json":
                shown = json.loads(exchange.body)
                if isinstance(shown, dict) and "id" in shown:
                    ids[shown["id"]] = response.json()["id"]
            path = httpx.URL(exchange.url).path
            for method, canonical in routes:
                if (
                    method == exchange.method
                    and route_pattern(canonical).fullmatch(path)
                    and response.is_success
                ):
                    ran_ok.add((method, canonical))
    assert set(endpoint_sections(text)) <= ran_ok, (
        f"endpoints without a successful example: {sorted(set(endpoint_sections(text)) - ran_ok)}"
    )


def _documented_parameters(part: Section) -> dict[str, set[str]]:
    where: dict[str, set[str]] = {"query": set(), "body": set(), "path": set()}
    for table in tables(part.body):
        for row in table:
            if "Parameter" in row and "In" in row:
                where[row["In"]].add(code(row["Parameter"]))
    return where


def test_documented_parameters_are_the_ones_each_call_takes(daemon: Netprofd) -> None:
    probe = "zz_undocumented"
    for (method, path), part in endpoint_sections(read(API)).items():
        documented = _documented_parameters(part)
        assert documented["path"] == set(re.findall(r"\{(\w+)\}", path)), path
        concrete = path.replace("{format}", "json").replace("{silence_id}", "nosuch")
        response = daemon.http.request(method, concrete, params={probe: "1"})
        if response.status_code == 400 and f"unknown parameter {probe!r}" in response.json()["error"]:
            takes = response.json()["error"].split("this call takes: ", 1)[1]
            actual = set() if takes == "none" else {name.strip() for name in takes.split(",")}
        else:  # a call that reads no query parameters at all (/healthz, /metrics)
            actual = set()
        assert documented["query"] == actual, f"{method} {path}: query parameters"
        if documented["body"]:
            refused = daemon.http.request(method, concrete, json={probe: 1})
            assert refused.status_code == 400, refused.text
            known = refused.json()["error"].split("known: ", 1)[1]
            assert documented["body"] == {name.strip() for name in known.split(",")}, f"{method} {path}: body"


# -- 3 and 4. troubleshooting, deployment: paths, configs, flags, API paths ---------


def test_docs_exist_and_link_each_other() -> None:
    for doc in ALL_DOCS:
        assert doc.is_file(), doc
    for doc in ALL_DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", read(doc)):
            if not target.startswith(("http://", "https://", "mailto:")):
                assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def _deploy_paths(text: str) -> set[str]:
    return {p.rstrip(".,:;") for p in re.findall(r"(?<![\w/.-])deploy/[\w./*-]*[\w*]", text)}


def test_every_deploy_path_exists() -> None:
    mentioned = set().union(*(_deploy_paths(read(doc)) for doc in ALL_DOCS))
    assert mentioned, "no deploy/ path mentioned"
    for path in sorted(mentioned):
        assert list(ROOT.glob(path)), f"{path} is mentioned but does not exist"


def test_every_config_file_mentioned_loads() -> None:
    configs = set()
    for doc in ALL_DOCS:
        configs |= {p for p in _deploy_paths(read(doc)) if p.endswith((".json", ".toml"))}
    assert "deploy/netprofd.toml" in configs
    assert any("phases/" in p for p in configs)
    for pattern in sorted(configs):
        for path in ROOT.glob(pattern):
            load_profiling_config(path)
            load_daemon_config(path)


def test_every_config_example_is_valid() -> None:
    """TOML and JSON blocks with configuration tables in them validate as a whole file would."""
    checked = 0
    for doc in ALL_DOCS:
        for block in code_blocks(read(doc)):
            if block.lang == "toml":
                data = tomllib.loads(block.text)
            elif block.lang == "json" and '"network_profiling"' in block.text:
                data = json.loads(block.text)
            else:
                continue
            if not data.keys() & {"network_profiling", "daemon", "rules", "notifiers", "debug"}:
                continue
            daemon_config_from_mapping(data, f"{doc.name} example")
            checked += 1
    assert checked >= 4


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from netprof_core.cli import build_parser
    from netprof_daemon.cli import _parser

    return {"netprofd": _parser(), "netprof": build_parser()}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


SHELL_OPERATORS = ("&&", "||", ";", "|", "&")


def _invocations(line: str) -> Iterator[tuple[str, list[str]]]:
    """(program, its words up to a shell operator) for each run of netprof or
    netprofd in a command line: first word, after an operator, after ``sudo``
    (``sudo -u USER``) or ``exec``, after ``VAR=value``; ``/usr/local/bin/netprofd`` too."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return
    for at, word in enumerate(words):
        if word.rsplit("/", 1)[-1].rsplit("=", 1)[-1] not in ("netprof", "netprofd"):
            continue
        before = words[:at]
        starts = (
            not before
            or before[-1] in (*SHELL_OPERATORS, "sudo", "exec")
            or re.fullmatch(r"\w+=\S*", before[-1]) is not None
            or before[-3:-1] == ["sudo", "-u"]
            or re.fullmatch(r"\w+=\S*netprofd?", word) is not None  # ExecStart=/usr/local/bin/netprofd
        )
        if not starts:
            continue
        rest = []
        for following in words[at + 1 :]:
            if following in SHELL_OPERATORS or following.startswith((">", "2>", "<")):
                break
            rest.append(following)
        yield word.rsplit("/", 1)[-1].rsplit("=", 1)[-1], rest


@functools.cache
def script_help(script: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, f"{script} --help: {done.stderr}"
    return done.stdout


def _has_flag(help_text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


def test_every_command_line_flag_exists() -> None:
    parsers = _parsers()
    every_option = set().union(*(_options(p) for p in parsers.values()))
    for sub in _subcommands(parsers["netprof"]).values():
        every_option |= _options(sub)
    seen = 0
    for doc in ALL_DOCS:
        for line in commands(read(doc)):
            if bare := re.fullmatch(r"(--[a-z][\w-]*)(?:[ =]\S+)?", line):  # `--check`, `--listen HOST:PORT`
                line = bare.group(1)
                scripts = sorted(set(re.findall(r"scripts/[\w-]+\.py", read(doc))))
                assert line in every_option or any(_has_flag(script_help(sc), line) for sc in scripts), (
                    f"{doc.name}: {line} is no option of netprof, netprofd or a script the doc names"
                )
                continue
            for program, words in _invocations(line):
                parser = parsers[program]
                if program == "netprof" and words and not words[0].startswith("-"):
                    subcommands = _subcommands(parser)
                    assert words[0] in subcommands, f"{doc.name}: `netprof {words[0]}` does not exist: {line}"
                    parser = subcommands[words[0]]
                options = _options(parser)
                for word in words:
                    if word.startswith("-") and word != "-":
                        flag = word.split("=", 1)[0]
                        assert flag in options, f"{doc.name}: {program} has no {flag}: {line}"
                        seen += 1
    assert seen >= 5


def test_every_api_path_mentioned_is_a_route() -> None:
    routes = registered_routes()
    patterns = [(method, route_pattern(canonical)) for method, canonical in routes]
    for doc in ALL_DOCS:
        if doc is API:
            continue  # its examples run for real, a 404 among them on purpose
        text = read(doc)
        for path in set(re.findall(r"/api/v1/debug/[\w/{}.-]*[\w}]", text)):
            assert any(p.fullmatch(path) for _, p in patterns), f"{doc.name}: {path} is no route"
        for line in commands(text):
            if not line.startswith("curl "):
                continue
            # The curl command alone, without what a pipe or a redirection adds.
            line = re.split(r"\s(?:\||>|&&|;|&)(?:\s|$)", line)[0]
            method, url, _, _ = parse_curl(line)
            path = httpx.URL(url).path
            if path.startswith("/api/") or path in ("/metrics", "/healthz"):
                assert any(m == method and p.fullmatch(path) for m, p in patterns), (
                    f"{doc.name}: {method} {path} is no route"
                )


def test_every_script_mentioned_exists_with_its_flags() -> None:
    """``python scripts/X.py --flag ...``: the script exists and its --help lists each flag."""
    helps: dict[str, str] = {}
    seen = 0
    for doc in ALL_DOCS:
        for line in commands(read(doc)):
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            for at, word in enumerate(words):
                if not re.fullmatch(r"scripts/[\w-]+\.py", word):
                    continue
                script = ROOT / word
                assert script.is_file(), f"{doc.name}: {word} does not exist"
                if at == 0 or not words[at - 1].rsplit("/", 1)[-1].startswith("python"):
                    continue  # named, not run
                helps[word] = script_help(word)
                for flag in words[at + 1 :]:
                    if flag in SHELL_OPERATORS or flag.startswith((">", "2>")):
                        break
                    if flag.startswith("--"):
                        flag = flag.split("=", 1)[0]
                        assert _has_flag(helps[word], flag), f"{doc.name}: {word} has no {flag}"
                        seen += 1
    assert seen >= 1


def test_deployment_claims_about_the_shipped_configs() -> None:
    """DEPLOYMENT.md: netprofd.toml holds phase 4's values, and phase 2 has the same."""
    text = read(DEPLOYMENT)
    assert "`deploy/netprofd.toml` without its `daemon` table" in text
    production = load_profiling_config(ROOT / "deploy/netprofd.toml").replace(app_name="x")
    for phase in ("phase4-production", "phase2-staging"):
        assert load_profiling_config(ROOT / f"deploy/phases/{phase}.json").replace(app_name="x") == production
