"""A decoder for PostgreSQL's ``pgoutput`` logical replication protocol (version 1).

It turns the stream into committed transactions of key-level changes. Only the key column
of a row is kept: the worker re-reads current rows anyway, so unchanged TOAST values
(``'u'``), which carry no data, are never mistaken for new text. Message formats:
https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..model import Change, Key, Op

__all__ = [
    "MESSAGE_PREFIX",
    "PG_EPOCH",
    "Decoder",
    "Relation",
    "Transaction",
]

MESSAGE_PREFIX = "vectorsync"  # logical messages carrying keys (snapshots, replays)
PG_EPOCH = 946_684_800.0  # 2000-01-01 in Unix seconds
_INT_TYPES = frozenset({20, 21, 23})  # int8, int2, int4

_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_I16 = struct.Struct(">h")
_BEGIN = struct.Struct(">QqI")  # final lsn, commit time, xid
_COMMIT = struct.Struct(">BQQq")  # flags, commit lsn, end lsn, commit time
_MESSAGE = struct.Struct(">BQ")  # flags, lsn


@dataclass(slots=True)
class Relation:
    oid: int
    table: str
    columns: list[str]
    key_index: int | None  # where the mapping's key sits in a tuple; None: not captured
    key_is_int: bool


@dataclass(slots=True)
class Transaction:
    position: int  # the commit's end LSN: acknowledged once everything before it is applied
    committed_at: float
    items: list[tuple[str, Key, Op]] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)  # filled at the commit


class Decoder:
    """Feed it XLogData payloads in stream order; completed transactions go to ``emit``.

    ``keys`` maps each captured table to its key column. Logical messages with
    ``MESSAGE_PREFIX`` and this decoder's ``slot`` add key changes inside their transaction;
    non-transactional ones (fences and heartbeats) go to ``on_marker`` with their LSN.
    """

    def __init__(
        self,
        keys: dict[str, str],
        slot: str,
        emit: Callable[[Transaction], None],
        on_marker: Callable[[int, str], None],
    ) -> None:
        self.keys = keys
        self.slot = slot
        self._emit = emit
        self._on_marker = on_marker
        self.relations: dict[int, Relation] = {}
        self._txn: Transaction | None = None
        self.decoded = 0  # row-level messages seen (for rate figures)

    def feed(self, data: bytes) -> None:
        kind = data[0]
        if kind == 0x49:  # 'I' insert: relid, 'N', new tuple
            self._row(data, "insert")
        elif kind == 0x55:  # 'U' update: relid, ['K'|'O' old tuple], 'N' new tuple
            self._update(data)
        elif kind == 0x44:  # 'D' delete: relid, 'K'|'O' old tuple
            self._row(data, "delete")
        elif kind == 0x42:  # 'B' begin
            _, ts, _ = _BEGIN.unpack_from(data, 1)
            self._txn = Transaction(position=0, committed_at=ts / 1e6 + PG_EPOCH)
        elif kind == 0x43:  # 'C' commit
            _, _, end_lsn, _ = _COMMIT.unpack_from(data, 1)
            txn, self._txn = self._open(), None
            txn.position = end_lsn
            at = txn.committed_at
            txn.changes = [
                Change(table=t, key=k, op=op, position=end_lsn, committed_at=at)
                for t, k, op in txn.items
            ]
            self._emit(txn)
        elif kind == 0x52:  # 'R' relation
            self._relation(data)
        elif kind == 0x54:  # 'T' truncate
            self._truncate(data)
        elif kind == 0x4D:  # 'M' logical message
            self._message(data)
        # 'Y' type and 'O' origin messages carry nothing we use

    # -- message bodies ---------------------------------------------------------------------
    def _open(self) -> Transaction:
        if self._txn is None:
            raise ValueError("pgoutput: change outside a transaction (stream out of sync)")
        return self._txn

    def _relation(self, data: bytes) -> None:
        oid = _U32.unpack_from(data, 1)[0]
        pos = 5
        namespace, pos = _cstring(data, pos)
        name, pos = _cstring(data, pos)
        pos += 1  # replica identity setting
        (ncols,) = _I16.unpack_from(data, pos)
        pos += 2
        columns: list[str] = []
        types: list[int] = []
        for _ in range(ncols):
            pos += 1  # flags (part of the key)
            col, pos = _cstring(data, pos)
            columns.append(col)
            types.append(_U32.unpack_from(data, pos)[0])
            pos += 8  # type oid, type modifier
        table = name if namespace == "public" else f"{namespace}.{name}"
        key = self.keys.get(table)
        index = columns.index(key) if key in columns else None
        self.relations[oid] = Relation(
            oid=oid,
            table=table,
            columns=columns,
            key_index=index,
            key_is_int=index is not None and types[index] in _INT_TYPES,
        )

    def _row(self, data: bytes, op: Op) -> None:
        rel = self.relations[_U32.unpack_from(data, 1)[0]]
        if rel.key_index is None:
            return
        key, _ = _tuple_key(data, 6, rel)  # skip relid and the 'N'/'K'/'O' marker
        self._add(rel.table, key, op)

    def _update(self, data: bytes) -> None:
        rel = self.relations[_U32.unpack_from(data, 1)[0]]
        if rel.key_index is None:
            return
        pos = 5
        old: Key | None = None
        if data[pos] in (0x4B, 0x4F):  # 'K' old key / 'O' old row: the key may have changed
            old, pos = _tuple_key(data, pos + 1, rel)
        key, _ = _tuple_key(data, pos + 1, rel)
        if old is not None and old != key:
            self._add(rel.table, old, "delete")
        self._add(rel.table, key, "update")

    def _truncate(self, data: bytes) -> None:
        (count,) = _I32.unpack_from(data, 1)
        pos = 6  # count, options
        for _ in range(count):
            rel = self.relations.get(_U32.unpack_from(data, pos)[0])
            pos += 4
            if rel is not None and rel.key_index is not None:
                self._add(rel.table, "", "truncate")

    def _message(self, data: bytes) -> None:
        flags, lsn = _MESSAGE.unpack_from(data, 1)
        prefix, pos = _cstring(data, 10)
        (length,) = _I32.unpack_from(data, pos)
        content = data[pos + 4 : pos + 4 + length]
        if not flags & 1:  # non-transactional: a fence or a heartbeat
            if prefix.startswith(MESSAGE_PREFIX):
                self._on_marker(lsn, content.decode())
            return
        if prefix != MESSAGE_PREFIX:
            return
        body: dict[str, Any] = orjson.loads(content)
        if body.get("slot") != self.slot:
            return
        op = body["op"]
        for key in body["keys"]:
            self._add(body["table"], key, op)

    def _add(self, table: str, key: Key, op: Op) -> None:
        self.decoded += 1
        self._open().items.append((table, key, op))


def _cstring(data: bytes, pos: int) -> tuple[str, int]:
    end = data.index(0, pos)
    return data[pos:end].decode(), end + 1


def _tuple_key(data: bytes, pos: int, rel: Relation) -> tuple[Key, int]:
    """The key value of a TupleData at ``pos`` and the position after the tuple."""
    (ncols,) = _I16.unpack_from(data, pos)
    pos += 2
    want = rel.key_index
    key: Key | None = None
    for i in range(ncols):
        kind = data[pos]
        pos += 1
        if kind == 0x74 or kind == 0x62:  # 't' text / 'b' binary: Int32 length + bytes
            (length,) = _I32.unpack_from(data, pos)
            pos += 4
            if i == want:
                raw = data[pos : pos + length]
                key = int(raw) if rel.key_is_int else raw.decode()
            pos += length
        # 'n' null and 'u' unchanged TOAST carry no bytes
    if key is None:
        raise ValueError(
            f"pgoutput: no value for key column {rel.columns[want or 0]!r} of {rel.table!r}; "
            "the key must be part of the table's replica identity"
        )
    return key, pos
