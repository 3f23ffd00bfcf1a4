"""Configuration: parsed once at the edge from ``vectorsync.toml`` plus env overrides.

Config objects are frozen pydantic models that carry no behaviour; the composition root
(:mod:`vectorsync.engine`) turns them into adapters.

Env overrides: ``VECTORSYNC_<SECTION>__<NAME>__<FIELD>=value`` replaces one value of the
file, e.g. ``VECTORSYNC_STATE__URL`` or ``VECTORSYNC_SOURCES__APP__PATH``. Values are parsed
as TOML scalars when they parse (``10``, ``true``, ``"x"``), else taken as strings.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from .errors import ConfigError

__all__ = [
    "CONFIG_ENV",
    "Config",
    "EmbedderConfig",
    "HashEmbedderConfig",
    "HttpConfig",
    "MappingConfig",
    "PostgresSourceConfig",
    "QdrantEdgeSinkConfig",
    "QdrantSinkConfig",
    "SentenceTransformersEmbedderConfig",
    "SinkConfig",
    "SourceConfig",
    "SqliteSourceConfig",
    "StateConfig",
    "SyncConfig",
    "load_config",
    "parse_config",
]

CONFIG_ENV = "VECTORSYNC_CONFIG"
ENV_PREFIX = "VECTORSYNC_"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StateConfig(_Frozen):
    url: str = "sqlite:///.vectorsync/state.db"
    embedding_cache: bool = True
    retention_days: float = Field(
        default=30, gt=0, description="history kept: runs, resolved errors and dead letters"
    )


class SqliteSourceConfig(_Frozen):
    kind: Literal["sqlite"]
    path: Path
    poll_interval: float = Field(
        default=0.2, gt=0, description="seconds between outbox polls when idle"
    )


class PostgresSourceConfig(_Frozen):
    kind: Literal["postgres"]
    url: str = Field(description="postgresql://user:password@host:port/database")
    capture: Literal["logical", "outbox"] | None = Field(
        default=None,
        description="logical replication (default where wal_level = logical) or a trigger outbox",
    )
    slot: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9_]{1,63}$",
        description="name of the replication slot, publication and outbox "
        "(default vectorsync_<source name>)",
    )
    poll_interval: float = Field(
        default=1.0, gt=0, description="longest wait for a change notification when idle"
    )
    heartbeat_interval: float = Field(
        default=10.0, gt=0, description="seconds between slot heartbeats (logical capture)"
    )

    @model_validator(mode="after")
    def _postgres_url(self) -> PostgresSourceConfig:
        if not self.url.startswith(("postgresql://", "postgres://")):
            raise ValueError("url must start with postgresql:// (e.g. postgresql://user@host/db)")
        return self


SourceConfig = Annotated[SqliteSourceConfig | PostgresSourceConfig, Field(discriminator="kind")]


class QdrantEdgeSinkConfig(_Frozen):
    kind: Literal["qdrant-edge"]
    path: Path = Path(".vectorsync/qdrant")


class QdrantSinkConfig(_Frozen):
    kind: Literal["qdrant"]
    url: str | None = None
    path: str | None = Field(default=None, description='a folder, or ":memory:"')
    api_key: SecretStr | None = None
    timeout: float = 30.0

    @model_validator(mode="after")
    def _one_location(self) -> QdrantSinkConfig:
        if (self.url is None) == (self.path is None):
            raise ValueError(
                'set exactly one of url (a Qdrant server) or path (a folder or ":memory:")'
            )
        return self


SinkConfig = Annotated[QdrantEdgeSinkConfig | QdrantSinkConfig, Field(discriminator="kind")]


class SentenceTransformersEmbedderConfig(_Frozen):
    kind: Literal["sentence-transformers"]
    model: str | None = Field(
        default=None, description="a local model folder; default: bundled MiniLM"
    )
    batch_size: int = Field(default=64, gt=0)
    threads: int | None = Field(default=None, gt=0, description="torch threads; default: all cores")
    normalize: bool = True


class HashEmbedderConfig(_Frozen):
    kind: Literal["hash"]
    dimension: int = Field(default=384, gt=0)
    batch_size: int = Field(default=256, gt=0)


EmbedderConfig = Annotated[
    SentenceTransformersEmbedderConfig | HashEmbedderConfig, Field(discriminator="kind")
]


class MappingConfig(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$")
    source: str
    table: str
    key: str = "id"
    text: str = Field(min_length=1, description="Jinja2 template over the row")
    payload: tuple[str, ...] = ()
    sink: str
    collection: str | None = None
    embedder: str = "default"
    max_text_length: int = Field(
        default=20_000, gt=0, description="longer rendered text is dead-lettered"
    )

    @property
    def collection_name(self) -> str:
        return self.collection or self.name


class SyncConfig(_Frozen):
    batch_size: int = Field(default=1000, gt=0, description="changes read from a source per batch")
    max_in_flight: int = Field(
        default=2, gt=0, description="batches between capture, embedding and writes"
    )


class HttpConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8787, ge=0, le=65535)
    token: SecretStr | None = Field(default=None, description="required beyond loopback")
    max_lag_seconds: float = Field(default=60.0, gt=0, description="/readyz lag threshold")


class Config(_Frozen):
    state: StateConfig = Field(default_factory=StateConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    sources: dict[str, SourceConfig]
    sinks: dict[str, SinkConfig]
    embedders: dict[str, EmbedderConfig]
    mappings: tuple[MappingConfig, ...] = Field(min_length=1)
    base_dir: Path = Field(Path("."), exclude=True)

    @model_validator(mode="after")
    def _references(self) -> Config:
        seen: set[str] = set()
        for i, m in enumerate(self.mappings):
            where = f"mappings[{i}] ({m.name!r})"
            if m.name in seen:
                raise ValueError(f"{where}: duplicate mapping name; names must be unique")
            seen.add(m.name)
            for field, table in (
                ("source", self.sources),
                ("sink", self.sinks),
                ("embedder", self.embedders),
            ):
                ref = getattr(m, field)
                if ref not in table:
                    known = ", ".join(sorted(table)) or "none"
                    raise ValueError(
                        f"{where}.{field}: unknown {field} {ref!r} (defined: {known}); "
                        f"add [{field}s.{ref}] or use one of those"
                    )
        return self

    def resolve(self, path: Path) -> Path:
        """A path from the config file, relative to the file's folder."""
        return path if path.is_absolute() else self.base_dir / path

    def state_url(self) -> str:
        prefix = "sqlite:///"
        url = self.state.url
        if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            return prefix + str(self.resolve(Path(url[len(prefix) :])))
        return url


def load_config(path: Path | str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file (``path``, else ``$VECTORSYNC_CONFIG``, else
    ``./vectorsync.toml``), applying ``VECTORSYNC_*`` env overrides."""
    env = os.environ if environ is None else environ
    file = Path(path or env.get(CONFIG_ENV) or "vectorsync.toml")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"config file {str(file)!r} not found; pass -c PATH or set {CONFIG_ENV}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from exc
    return parse_config(data, base_dir=file.resolve().parent, environ=env, origin=str(file))


def parse_config(
    data: Mapping[str, Any],
    *,
    base_dir: Path = Path("."),
    environ: Mapping[str, str] | None = None,
    origin: str = "config",
) -> Config:
    merged = _apply_env(dict(data), {} if environ is None else environ)
    try:
        return Config.model_validate({**merged, "base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if len(path) < 2:
            continue
        node = data
        for part in path[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[path[-1]] = _scalar(raw)
    return data


def _scalar(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _describe(exc: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid configuration"]
    for err in exc.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling"
        elif err["type"] == "union_tag_invalid":
            msg = f"{msg}; use one of the kinds listed"
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)
