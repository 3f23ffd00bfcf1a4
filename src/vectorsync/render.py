"""Turn a source row into the text to embed and the payload to store."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import meta, nodes

from .config import MappingConfig
from .errors import ConfigError, RecordError, RenderError
from .model import InvalidText, Row, payload_hash
from .sinks.base import IndexType

__all__ = ["Rendered", "Renderer", "template_attributes", "template_columns"]

_ENV = jinja2.Environment(
    undefined=jinja2.StrictUndefined,
    finalize=lambda value: "" if value is None else value,
    autoescape=False,
)
_JSON_SCALARS = (str, int, float, bool, type(None))


def template_columns(template: str) -> set[str]:
    """The row columns a template reads (top-level names only)."""
    try:
        return set(meta.find_undeclared_variables(_ENV.parse(template)))
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(
            f"text template: syntax error on line {exc.lineno}: {exc.message}"
        ) from exc


def template_attributes(template: str) -> list[tuple[str, str]]:
    """(column, attribute) for every ``column.attribute`` or ``column['key']`` the template
    reads, so validation can refuse what a column's type cannot have."""
    found: list[tuple[str, str]] = []
    for node in _ENV.parse(template).find_all((nodes.Getattr, nodes.Getitem)):
        if isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name):
            found.append((node.node.name, node.attr))
        elif (
            isinstance(node, nodes.Getitem)
            and isinstance(node.node, nodes.Name)
            and isinstance(node.arg, nodes.Const)
            and isinstance(node.arg.value, str)
        ):
            found.append((node.node.name, node.arg.value))
    return found


@dataclass(frozen=True, slots=True)
class Rendered:
    text: str
    payload: dict[str, Any]
    payload_hash: str
    truncated: bool = False  # the text was cut to max_text_length


def _plain_parts(template: str) -> list[tuple[bool, str]] | None:
    """A template made only of literal text and bare ``{{ name }}`` substitutions, as
    (is_name, text) parts; None when it uses anything else (filters, tags, expressions)."""
    parts: list[tuple[bool, str]] = []
    for node in _ENV.parse(template).body:
        if not isinstance(node, nodes.Output):
            return None
        for child in node.nodes:
            if isinstance(child, nodes.TemplateData):
                parts.append((False, child.data))
            elif isinstance(child, nodes.Name) and child.ctx == "load":
                parts.append((True, child.name))
            else:
                return None
    return parts


class Renderer:
    def __init__(
        self, mapping: MappingConfig, index_types: Mapping[str, IndexType] | None = None
    ) -> None:
        self._mapping = mapping
        self._limit = mapping.text_limit  # read per record: a property computes it
        self._index_types = dict(index_types or {})
        try:
            self._template = _ENV.from_string(mapping.text)
            # Jinja2 builds a context per render (~25 µs); plain substitution templates,
            # the common case, take a direct path with the same output and errors.
            self._parts = _plain_parts(mapping.text)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(
                f"mapping {mapping.name!r}: text template syntax error on line {exc.lineno}: "
                f"{exc.message}"
            ) from exc

    def __reduce__(self) -> tuple[type[Renderer], tuple[MappingConfig, dict[str, IndexType]]]:
        """Pickled as its settings (the compiled template is rebuilt where it loads)."""
        return Renderer, (self._mapping, self._index_types)

    def render(self, row: Row) -> Rendered:
        if InvalidText in map(type, row.values()):  # (types compare by identity)
            name, bad = next((n, v) for n, v in row.items() if type(v) is InvalidText)
            raise RecordError(
                f"column {name!r} is not valid UTF-8 ({bytes(bad)[:40]!r}); fix the row's encoding",
                kind="invalid_utf8",
            )
        text = self._text(row)
        truncated = len(text) > self._limit
        if truncated:
            text = text[: self._limit]
        payload = {name: _payload_value(name, row.get(name)) for name in self._mapping.payload}
        for name, kind in self._index_types.items():
            value = payload.get(name)
            if value is not None and not _fits(kind, value):
                raise RecordError(
                    f"payload field {name!r} holds {value!r} ({type(value).__name__}) but is "
                    f"indexed as {kind}; fix the row or change the column's declared type",
                    kind="payload_type",
                )
        try:
            digest = payload_hash(payload)
        except TypeError as exc:  # orjson: a string that is not valid UTF-8, say
            raise RecordError(f"payload cannot be stored: {exc}", kind="payload_value") from exc
        return Rendered(text=text, payload=payload, payload_hash=digest, truncated=truncated)

    def _text(self, row: Row) -> str:
        try:
            text = self._substitute(row) if self._parts is not None else self._template.render(row)
        except jinja2.TemplateError as exc:
            raise RenderError(f"text template failed: {exc}") from exc
        except Exception as exc:  # a filter or attribute raised on this row's data
            raise RenderError(f"text template failed: {type(exc).__name__}: {exc}") from exc
        if not text.strip():
            nulls = _null_columns(row, template_columns(self._mapping.text))
            why = f" (NULL or blank: {', '.join(nulls)})" if nulls else ""
            raise RecordError(f"rendered text is empty{why}", kind="empty_text")
        if len(text) > self._limit and self._mapping.long_text != "truncate":
            raise RecordError(
                f"rendered text has {len(text)} characters, over max_text_length="
                f"{self._limit}; shorten the row, raise the limit or set "
                'long_text = "truncate"',
                kind="text_too_long",
            )
        return text

    def _substitute(self, row: Row) -> str:
        assert self._parts is not None
        out = []
        for is_name, text in self._parts:
            if not is_name:
                out.append(text)
                continue
            try:
                value = row[text]
            except KeyError:
                raise RenderError(f"text template failed: '{text}' is undefined") from None
            out.append("" if value is None else str(value))
        return "".join(out)


def _fits(kind: IndexType, value: Any) -> bool:
    if isinstance(value, list):
        return all(_fits(kind, v) for v in value)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    return isinstance(value, str)  # keyword, text, datetime


_INT64 = 2**63


def _payload_value(name: str, value: Any) -> Any:
    """The value as every sink can store it (JSON: finite numbers, 64-bit integers)."""
    kind = type(value)
    if kind is str or value is None or kind is bool:  # the common cases first
        return value
    if kind is int and -_INT64 <= value < _INT64:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise RecordError(
            f"payload field {name!r} holds {value}, which no vector store payload can hold "
            "(JSON has no NaN or infinity); store NULL or a number in the row",
            kind="payload_value",
        )
    if isinstance(value, int) and not isinstance(value, bool) and not -_INT64 <= value < _INT64:
        raise RecordError(
            f"payload field {name!r} holds {value}, outside the 64-bit integer range vector "
            "stores keep; store it as text or a smaller number",
            kind="payload_value",
        )
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, list | tuple):
        return [_payload_value(name, v) for v in value]
    if isinstance(value, dict):
        return {str(k): _payload_value(name, v) for k, v in value.items()}
    raise RenderError(
        f"payload field {name!r} holds a {type(value).__name__}, which a vector store payload "
        "cannot hold; cast it in the source or drop the field from payload"
    )


def _null_columns(row: Row, columns: Iterable[str]) -> list[str]:
    return sorted(c for c in columns if row.get(c) is None or str(row.get(c)).strip() == "")
