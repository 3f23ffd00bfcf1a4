"""Secrets never leave the process: one scrubber for every text that does.

Drivers put connection URLs (with their passwords) into exception messages, and those
messages travel on: into logs, the CLI's error output, the state store's error log and
dead-letter queue, and HTTP responses. Each of those exits passes its text through
:func:`redact`, which masks the password of every URL in it and every secret value the
configuration declared (API keys, tokens, passwords given as separate fields).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["MASK", "redact", "redact_value", "register_secrets"]

MASK = "***"
# scheme://[user]:password@ — the password is everything up to the last "@" before the
# host part ends (a password may itself contain "@" or ":").
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"]*:)[^\s'\"]*@")
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None


def register_secrets(values: Iterable[str | None]) -> None:
    """Remember secret values (from the config) so that any text carrying one is masked."""
    global _pattern
    fresh = {v for v in values if v and len(v) >= 4} - _secrets
    if not fresh:
        return
    _secrets.update(fresh)
    ordered = sorted(_secrets, key=len, reverse=True)  # longest first: no partial masks
    _pattern = re.compile("|".join(re.escape(v) for v in ordered))


def redact(text: str) -> str:
    """``text`` with URL passwords and registered secrets replaced by ``***``."""
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}{MASK}@", text)
    if _pattern is not None:
        text = _pattern.sub(MASK, text)
    return text


def redact_value(value: Any) -> Any:
    """Redact every string inside a JSON-like value (dicts, lists, tuples)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value
