"""Messages and checks the sinks share for aliases, so each store refuses alike."""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import PermanentError


def aliases_of(aliases: Mapping[str, str], collection: str) -> list[str]:
    """The aliases naming ``collection``, sorted."""
    return sorted(a for a, c in aliases.items() if c == collection)


def check_set_alias(
    sink: str, alias: str, collection: str, physical: set[str], aliases: Mapping[str, str]
) -> None:
    """PermanentError unless ``alias`` may be pointed at ``collection``."""
    if alias in physical:
        raise PermanentError(
            f"sink {sink!r}: cannot make {alias!r} an alias: a collection has that name "
            f"(made before index versions); rename_collection({alias!r}, {alias + '__v1'!r}) "
            "first, or drop it"
        )
    if collection in aliases:
        raise PermanentError(
            f"sink {sink!r}: cannot point alias {alias!r} at {collection!r}: it is an alias "
            f"itself (of {aliases[collection]!r}); name a collection"
        )
    if collection not in physical:
        raise PermanentError(
            f"sink {sink!r}: cannot point alias {alias!r} at {collection!r}: no such collection"
        )


def check_rename(
    sink: str, old: str, new: str, physical: set[str], aliases: Mapping[str, str]
) -> None:
    if old in aliases:
        raise PermanentError(
            f"sink {sink!r}: cannot rename {old!r}: it is an alias; use set_alias to move it"
        )
    if old not in physical:
        raise PermanentError(f"sink {sink!r}: cannot rename {old!r}: no such collection")
    if new in physical or new in aliases:
        raise PermanentError(f"sink {sink!r}: cannot rename {old!r} to {new!r}: {new!r} exists")
    if names := aliases_of(aliases, old):
        raise PermanentError(_live(sink, old, names, "rename"))


def check_drop(sink: str, name: str, aliases: Mapping[str, str]) -> None:
    if name in aliases:
        raise PermanentError(
            f"sink {sink!r}: cannot drop {name!r}: it is an alias of {aliases[name]!r}, not a "
            "collection; drop the collection once no alias names it"
        )
    if names := aliases_of(aliases, name):
        raise PermanentError(_live(sink, name, names, "drop"))


def rename_unsupported(sink: str, old: str, where: str) -> PermanentError:
    return PermanentError(
        f"sink {sink!r}: cannot rename collection {old!r}: {where} has no collection rename. "
        f"Build the new version under another name, then drop_collection({old!r}) and "
        f"set_alias({old!r}, <new version>) (readers of {old!r} miss it in between)"
    )


def _live(sink: str, collection: str, aliases: list[str], verb: str) -> str:
    return (
        f"sink {sink!r}: cannot {verb} collection {collection!r}: it is live, named by alias "
        f"{', '.join(map(repr, aliases))}; point the alias elsewhere with set_alias first"
    )
