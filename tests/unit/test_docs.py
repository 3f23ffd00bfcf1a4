"""The user guide stays true to the code.

For README.md and every docs/*.md page:

* every ```toml block loads with the real config loader (a fragment is completed with a
  minimal config first), so a key that does not exist, or a value of the wrong kind, fails;
* every ``vectorsync …`` command, in ```bash / ```console blocks and in inline code, names a
  real command (its ``--help`` exits 0) and only options that command has;
* docs/configuration.md lists every key of every config model, each with its real default;
* every ``VECTORSYNC_*`` variable, HTTP route, relative link, test and bench file the guide
  names exists.

The CLI runs in-process (typer's CliRunner), each distinct ``--help`` once.
"""

from __future__ import annotations

import functools
import glob
import importlib
import re
import shlex
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import BaseModel, SecretStr
from typer.testing import CliRunner

from vectorsync import config as c
from vectorsync.cli import app
from vectorsync.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REFERENCE = ROOT / "docs" / "configuration.md"

FENCE = re.compile(r"^( *)```(\w*)[^\n]*\n(.*?)^\1```[ \t]*$", re.M | re.S)  # also in lists
SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
SHELL = {"bash", "console", "sh", "shell"}
OPERATOR = re.compile(r"^[;&|<>()]+$")
# a fragment's blanks are filled from this minimal config (its names: app, vectors, default)
BASE: dict[str, Any] = {
    "sources": {"app": {"kind": "sqlite", "path": "app.db"}},
    "sinks": {"vectors": {"kind": "qdrant-edge"}},
    "embedders": {"default": {"kind": "hash"}},
    "mappings": [
        {
            "name": "articles",
            "source": "app",
            "table": "articles",
            "text": "{{ title }}",
            "sink": "vectors",
        }
    ],
}
NAMED = ("sources", "sinks", "embedders")

# docs/configuration.md: a heading's code spans (joined by a space) -> the model its table lists
MODELS: dict[str, type[BaseModel]] = {
    "[state]": c.StateConfig,
    "[sync]": c.SyncConfig,
    "[http]": c.HttpConfig,
    "[bus]": c.BusConfig,
    '[sources.NAME] kind = "sqlite"': c.SqliteSourceConfig,
    '[sources.NAME] kind = "postgres"': c.PostgresSourceConfig,
    '[sources.NAME] kind = "falkordb"': c.FalkorDBSourceConfig,
    '[sources.NAME] kind = "neo4j"': c.Neo4jSourceConfig,
    '[sources.NAME] kind = "surrealdb"': c.SurrealDBSourceConfig,
    '[sinks.NAME] kind = "qdrant-edge"': c.QdrantEdgeSinkConfig,
    '[sinks.NAME] kind = "qdrant"': c.QdrantSinkConfig,
    '[sinks.NAME] kind = "pgvector"': c.PgvectorSinkConfig,
    '[sinks.NAME] kind = "chroma"': c.ChromaSinkConfig,
    '[sinks.NAME] kind = "falkordb"': c.FalkorDBSinkConfig,
    '[sinks.NAME] kind = "neo4j"': c.Neo4jSinkConfig,
    '[embedders.NAME] kind = "sentence-transformers"': c.SentenceTransformersEmbedderConfig,
    '[embedders.NAME] kind = "model2vec"': c.Model2VecEmbedderConfig,
    '[embedders.NAME] kind = "hash"': c.HashEmbedderConfig,
    '[embedders.NAME] kind = "openai"': c.OpenAIEmbedderConfig,
    '[embedders.NAME] kind = "sparse"': c.SparseEmbedderConfig,
    "[[mappings]]": c.MappingConfig,
    "[[mappings.related]]": c.RelatedConfig,
    "[[mappings.edges]]": c.EdgeConfig,
    "[[mappings.vectors]]": c.VectorConfig,
    "[mappings.chunking]": c.ChunkingConfig,
}
SECTION_MODELS: dict[str, tuple[type[BaseModel], ...]] = {
    "state": (c.StateConfig,),
    "sync": (c.SyncConfig,),
    "http": (c.HttpConfig,),
    "bus": (c.BusConfig,),
    "sources": tuple(m for k, m in MODELS.items() if k.startswith("[sources.")),
    "sinks": tuple(m for k, m in MODELS.items() if k.startswith("[sinks.")),
    "embedders": tuple(m for k, m in MODELS.items() if k.startswith("[embedders.")),
}


@dataclass(frozen=True)
class Block:
    page: str
    lang: str
    text: str


HEREDOC_TOML = re.compile(r"^cat > \S+\.toml <<'(\w+)'\n(.*?)^\1$", re.M | re.S)


def _blocks() -> list[Block]:
    """Fenced blocks; a TOML file a shell block writes (``cat > x.toml <<'EOF'``) is one too."""
    found = []
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        for m in FENCE.finditer(page.read_text(encoding="utf-8")):
            block = Block(name, m.group(2), textwrap.dedent(m.group(3)))
            found.append(block)
            if block.lang in SHELL:
                found += [
                    Block(name, "toml", h.group(2)) for h in HEREDOC_TOML.finditer(block.text)
                ]
    return found


def _prose(page: Path) -> str:
    """A page without its fenced blocks; a table's escaped pipe read as a pipe."""
    return FENCE.sub("", page.read_text(encoding="utf-8")).replace("\\|", "|")


def _spans() -> list[tuple[str, str]]:
    return [(p.relative_to(ROOT).as_posix(), s) for p in PAGES for s in SPAN.findall(_prose(p))]


def _id(value: Any) -> str:
    return re.sub(r"\s+", " ", str(value))[:60]


# -- TOML blocks ------------------------------------------------------------------------------


def _completed(data: dict[str, Any]) -> dict[str, Any]:
    """A whole config as it is; a fragment on top of BASE (its named entries added to or
    replacing BASE's, its other sections replacing them)."""
    if all(k in data for k in (*NAMED, "mappings")):
        return data
    merged: dict[str, Any] = {k: v for k, v in BASE.items() if k not in data}
    for key, value in data.items():
        merged[key] = {**BASE[key], **value} if key in NAMED else value
    return merged


TOML = [b for b in _blocks() if b.lang == "toml"]


def test_the_guide_has_toml_blocks() -> None:
    assert len(TOML) >= 5, [b.page for b in TOML]


@pytest.mark.parametrize("block", TOML, ids=lambda b: f"{b.page}:{_id(b.text)}")
def test_every_toml_block_loads_with_the_real_config_loader(block: Block) -> None:
    data = tomllib.loads(block.text)
    parse_config(_completed(data), environ={}, origin=block.page)


# -- commands ---------------------------------------------------------------------------------


def _shell_tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote: words are enough to find options
        return line.split("#", 1)[0].split()


def _invocations(tokens: list[str]) -> list[list[str]]:
    """The arguments after each ``vectorsync`` word, up to a shell operator."""
    found: list[list[str]] = []
    current: list[str] | None = None
    for token in tokens:
        if token == "vectorsync" or token.endswith("bin/vectorsync"):
            current = []
            found.append(current)
        elif OPERATOR.match(token):
            current = None
        elif current is not None:
            current.append(token)
    return found


def _shell_commands(block: Block) -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    heredoc: str | None = None
    for line in block.text.splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        opened = re.search(r"<<-?\s*'?\"?(\w+)", line)
        heredoc = opened.group(1) if opened else None
        line = re.sub(r"^\s*\$ ", "", line)
        found += [(line.strip(), args) for args in _invocations(_shell_tokens(line))]
    return found


def _inline_commands() -> list[tuple[str, list[str]]]:
    """Inline ``vectorsync …`` code, and ``<command> --option …`` code naming a command."""
    names = set(_root().commands)
    found = []
    for _, span in _spans():
        try:
            words = shlex.split(span)
        except ValueError:
            words = span.split()
        if words[:1] == ["vectorsync"] and len(words) > 1 and re.match(r"^-*[a-z]", words[1]):
            found.append((span, words[1:]))
        elif words and words[0] in names and len(words) > 1:
            group = _is_group(_root().commands[words[0]])
            if group or any(w.startswith("-") for w in words[1:]):
                found.append((span, words))
    return found


def _commands() -> list[tuple[str, list[str]]]:
    shell = [cmd for b in _blocks() if b.lang in SHELL for cmd in _shell_commands(b)]
    return shell + _inline_commands()


@functools.cache
def _root() -> Any:
    """The CLI as typer builds it (typer ships its own click: commands are read by shape)."""
    group = typer.main.get_command(app)
    assert _is_group(group)
    return group


def _is_group(command: Any) -> bool:
    return isinstance(getattr(command, "commands", None), dict)


def _resolve(args: list[str]) -> tuple[tuple[str, ...], Any, list[str]]:
    """The command path the arguments name, its command object, and the rest."""
    command: Any = _root()
    path: list[str] = []
    rest = list(args)
    while _is_group(command) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        sub = command.commands.get(name)
        assert sub is not None, (
            f"`vectorsync {' '.join([*path, name])}`: no such command "
            f"(commands: {', '.join(sorted(command.commands))})"
        )
        path.append(name)
        command = sub
    return tuple(path), command, rest


@functools.cache
def _help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"vectorsync {' '.join(path)} --help: {result.output}"
    return result.output


def _options_used(rest: list[str]) -> list[str]:
    used = []
    for word in rest:
        if word == "--":
            break
        word = word.strip("[](),")
        if re.match(r"^--?[A-Za-z]", word):
            used.append(word.split("=", 1)[0].removesuffix("..."))
    return used


def _declared(command: Any) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names.update(param.opts, param.secondary_opts)
    return names


COMMANDS = _commands()


def test_the_guide_shows_commands() -> None:
    assert len(COMMANDS) >= 30, COMMANDS


@pytest.mark.parametrize(("line", "args"), COMMANDS, ids=lambda v: _id(v))
def test_every_command_exists_with_the_options_shown(line: str, args: list[str]) -> None:
    path, command, rest = _resolve(args)
    shown = _help(path)
    for option in _options_used(rest):
        assert option in _declared(command), (
            f"{line!r}: `vectorsync {' '.join(path)}` has no option {option} "
            f"(it has: {', '.join(sorted(_declared(command)))})"
        )
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", shown), (line, option)


def test_every_option_named_alone_belongs_to_a_command() -> None:
    """`--once`, `-c/--config`: inline options without their command."""

    def every(command: Any) -> set[str]:
        names = _declared(command)
        for sub in getattr(command, "commands", {}).values():
            names |= every(sub)
        return names

    known = every(_root())
    wrong = []
    for page, span in _spans():
        if re.match(r"^--?[A-Za-z]", span):
            first = span.split()[0].split("=", 1)[0].strip(",.;:")
            wrong += [(page, span) for option in first.split("/") if option not in known]
    assert not wrong, wrong


# -- the configuration reference ----------------------------------------------------------


@dataclass(frozen=True)
class Row:
    heading: str
    key: str
    default: str
    meaning: str


def _reference() -> dict[str, list[Row]]:
    """docs/configuration.md: per heading, the rows of its `| key | default | meaning |` table."""
    tables: dict[str, list[Row]] = {}
    heading = ""
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            heading = " ".join(SPAN.findall(line))
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) != 3 or cells[0] in ("key", "") or set(cells[0]) <= {"-", ":"}:
            continue
        keys = SPAN.findall(cells[0])
        assert len(keys) == 1, f"{heading}: one `key` per row, not {cells[0]!r}"
        tables.setdefault(heading, []).append(Row(heading, keys[0], cells[1], cells[2]))
    return tables


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return value


def _default_problem(model: type[BaseModel], row: Row) -> str | None:
    """Why the row's default is not the model's, or None. A default cell is `—` (nothing
    unless set), a TOML value in code (that value), or words (computed when not set)."""
    field = model.model_fields[row.key]
    default = None if field.is_required() else _plain(field.get_default(call_default_factory=True))
    if row.default.startswith("—"):
        ok = field.is_required() or default in (None, "", [])
        return None if ok else f"the default is {default!r}, not —"
    spans = SPAN.findall(row.default)
    try:
        shown = tomllib.loads(f"v = {spans[0]}")["v"] if spans else None
    except tomllib.TOMLDecodeError:
        shown = None
    else:
        same = shown == default and (type(shown) is bool) == (type(default) is bool)
        return None if same else f"the default is {default!r}, not {shown!r}"
    if field.is_required() or default is not None:
        return f"the default is {default!r}: show it as a TOML value in code"
    return None


def test_the_reference_lists_every_key_of_every_section_with_its_default() -> None:
    tables = _reference()
    assert set(tables) == set(MODELS), (
        f"headings without a model: {sorted(set(tables) - set(MODELS))}; "
        f"models without a table: {sorted(set(MODELS) - set(tables))}"
    )
    problems = []
    for heading, rows in tables.items():
        model = MODELS[heading]
        keys = [r.key for r in rows]
        fields = set(model.model_fields)
        if sorted(keys) != sorted(fields):
            twice = sorted({k for k in keys if keys.count(k) > 1})
            problems.append(
                f"{heading}: unknown {sorted(set(keys) - fields)}, "
                f"missing {sorted(fields - set(keys))}, twice {twice}"
            )
        for row in rows:
            if row.key in fields:
                why = _default_problem(model, row)
                if why:
                    problems.append(f"{heading} {row.key}: {why}")
            if not row.meaning:
                problems.append(f"{heading} {row.key}: say what it means")
    assert not problems, "\n".join(problems)


# -- environment variables, routes, links, tests, Python names ------------------------------

ENV = re.compile(r"(?<![\w$])VECTORSYNC_[A-Z][A-Z0-9_]*\b(?!<)")


def _env_problem(name: str, cli_vars: set[str]) -> str | None:
    if "__" not in name:
        return None if name in cli_vars else "not a variable any command reads"
    path = name.removeprefix("VECTORSYNC_").lower().split("__")
    models = SECTION_MODELS.get(path[0])
    if models is None:
        return f"no section {path[0]!r} can be overridden"
    field = path[2] if path[0] in NAMED and len(path) == 3 else None
    if path[0] not in NAMED and len(path) == 2:
        field = path[1]
    if field is None or not any(field in m.model_fields for m in models):
        return "names no config key"
    return None


def test_every_environment_variable_named_exists() -> None:
    def envvars(command: Any) -> set[str]:
        found = {p.envvar for p in command.params if isinstance(p.envvar, str)}
        for sub in getattr(command, "commands", {}).values():
            found |= envvars(sub)
        return found

    cli_vars = envvars(_root()) | {c.CONFIG_ENV}
    named = {n for p in PAGES for n in ENV.findall(p.read_text(encoding="utf-8"))}
    assert named
    wrong = {n: why for n in sorted(named) if (why := _env_problem(n, cli_vars))}
    assert not wrong, wrong


ROUTE = re.compile(r"^(?:(GET|POST|HEAD) )?(/(?:api/[\w/{}]+|metrics|healthz|readyz))(?:\?\S*)?$")


def test_every_http_route_named_exists() -> None:
    pytest.importorskip("starlette")
    from vectorsync.server import create_app

    routes = {r.path: r.methods or set() for r in create_app(None).routes}  # type: ignore[arg-type, attr-defined]
    named = {(m.group(1) or "GET", m.group(2)) for _, s in _spans() if (m := ROUTE.match(s))}
    assert len(named) >= 8, named
    wrong = [(method, path) for method, path in named if method not in routes.get(path, ())]
    assert not wrong, f"no such route: {wrong} (routes: {sorted(routes)})"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.cache
def _anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M):
        slug, n = _slug(heading), 1
        while slug in found:
            slug, n = f"{_slug(heading)}-{n}", n + 1
        found.add(slug)
    return found


def test_every_relative_link_and_anchor_exists() -> None:
    wrong = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page)):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            if not linked.exists():
                wrong.append((page.name, target, "no such file"))
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                wrong.append((page.name, target, "no such heading"))
    assert not wrong, wrong


@functools.cache
def _tests_source() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").rglob("*.py"))


def test_every_test_and_bench_file_named_exists() -> None:
    wrong = []
    for page, span in _spans():
        for ref in re.findall(r"(?:^|\s)((?:tests|bench)/[\w/.*-]+(?:::\w+)?)", span):
            file, _, name = ref.partition("::")
            matches = glob.glob(str(ROOT / file))
            if not matches:
                wrong.append((page, ref, "no such file"))
            elif name and not re.search(rf"def {name}\(", Path(matches[0]).read_text()):
                wrong.append((page, ref, "no such test"))
        if re.fullmatch(r"test_\w+", span) and not re.search(rf"def {span}\(", _tests_source()):
            wrong.append((page, span, "no such test"))
    assert not wrong, wrong


NOT_PYTHON = {"vectorsync.toml", "vectorsync.snapshots"}  # the config file, a PostgreSQL table


def test_every_python_name_named_exists() -> None:
    """`vectorsync.graph.GraphWriter`, `vectorsync.sources.memory`: importable."""
    wrong = []
    for page, span in _spans():
        if not re.fullmatch(r"vectorsync(\.\w+)+", span) or span in NOT_PYTHON:
            continue
        parts = span.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                value: Any = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    value = getattr(value, attr)
            except AttributeError:
                wrong.append((page, span))
            break
    assert not wrong, wrong
