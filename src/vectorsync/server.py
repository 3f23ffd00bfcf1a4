"""The HTTP side: Prometheus metrics, health and readiness probes, a JSON API and the
dashboard. Bound to 127.0.0.1 by default; any other address requires a bearer token.

Without a token the server trusts no browser page but its own: it answers only to loopback
Host names (a DNS-rebound name is refused) and refuses state-changing requests from another
origin or without a marker a cross-site form cannot send. With a token, the token is the
protection: a page on another site cannot send it."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import re
from dataclasses import asdict
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .engine import Engine
from .errors import ConfigError, PermanentError, VectorsyncError
from .metrics import prometheus_text
from .redact import redact, redact_value
from .search import find

__all__ = ["create_app", "require_token"]

CHECK_MODES = ("full", "sample", "quick", "prove")
MAX_LIMIT = 1000
MAX_SAMPLE = 1_000_000
MAX_ID = 2**63 - 1  # the state store's integer ids are signed 64-bit
CHECK_RETRY_AFTER_SECONDS = 5
MARKER_HEADER = "X-Vectorsync"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_HOST = re.compile(r"(?:\[(?P<ipv6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9.\-]+))(?::[0-9]{1,5})?")


def require_token(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token (the API can replay dead letters)."""
    if not _is_loopback(host) and not token:
        raise ConfigError(
            f"http: serving on {host!r} requires a bearer token; set [http] token "
            "(or VECTORSYNC_HTTP__TOKEN), or bind to 127.0.0.1"
        )


def _is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _BadRequest(PermanentError):
    """A request parameter out of its range: the client's fault (400)."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


class _Guard:
    """Checks every HTTP request before a route sees it: the bearer token when one is
    configured; otherwise the Host (DNS rebinding) and, for state-changing requests, the
    origin and a non-simple-request marker (CSRF)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self._app = app
        self._token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(Request(scope))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self._app(scope, receive, send)

    def _refusal(self, request: Request) -> Response | None:
        if self._token is not None:
            return _unauthorized(request, self._token)
        return _foreign_host(request) or _cross_site(request)


def _unauthorized(request: Request, expected: bytes) -> Response | None:
    """401 unless ``Authorization: Bearer <token>`` (scheme case-insensitive, RFC 7235)."""
    # probes stay open, and so does the page itself: it holds no data (its API calls send
    # the token from #token=...), and a browser opening it sends no Authorization header
    if request.url.path in ("/healthz", "/"):
        return None
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    # Starlette decodes headers as latin-1: encoding back gives the bytes as sent
    matches = hmac.compare_digest(credentials.strip().encode("latin-1"), expected)
    if matches and scheme.lower() == "bearer":
        return None
    return _error(
        "missing or wrong bearer token: send the header 'Authorization: Bearer <token>' "
        "with the [http] token of this server",
        401,
        headers={"WWW-Authenticate": "Bearer"},
    )


def _foreign_host(request: Request) -> Response | None:
    """421 unless the Host header names a loopback address: a page whose own name was
    rebound to 127.0.0.1 would otherwise be same-origin with this server."""
    host = request.headers.get("host", "")
    match = _HOST.fullmatch(host.lower())
    if match and _is_loopback(match.group("ipv6") or match.group("name")):
        return None
    return _error(
        f"Host {host!r} is refused: without a token this server answers only to loopback "
        "names (localhost, 127.0.0.1, [::1]); browse to http://127.0.0.1:<port>/, or set "
        "[http] token to serve other names",
        421,
    )


def _cross_site(request: Request) -> Response | None:
    """403 for a state-changing request from another origin, or without a marker that makes
    browsers preflight it (a cross-site form or simple fetch cannot send one)."""
    if request.method in _SAFE_METHODS:
        return None
    origin = request.headers.get("origin") or request.headers.get("referer")
    # host[:port] only, not the scheme: a TLS-terminating proxy would change it
    own = request.headers.get("host", "").lower()
    if origin is not None and urlsplit(origin).netloc.lower() != own:
        return _error(
            f"{request.method} from origin {origin!r} refused: it is not this server's; "
            "use the dashboard served here, or a client that sends no Origin",
            403,
        )
    if MARKER_HEADER.lower() in request.headers or _media_type(request) == "application/json":
        return None
    return _error(
        f"{request.method} {request.url.path} refused: send the header "
        f"'{MARKER_HEADER}: 1' (or 'Content-Type: application/json'), which a cross-site "
        "form cannot",
        403,
    )


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def _int_param(request: Request, name: str, default: int, high: int) -> int:
    raw = request.query_params.get(name)
    return default if raw is None else _bounded(name, raw, high)


def _bounded(name: str, raw: str, high: int) -> int:
    """``raw`` as an integer from 1 to ``high``, else a 400 naming the parameter (checked
    as text first: ``int()`` accepts ``1_0`` and refuses very long digit strings)."""
    digits = raw.isascii() and raw.isdigit() and len(raw) <= len(str(high))
    if not (digits and 1 <= int(raw) <= high):
        raise _BadRequest(name, f"{name}={raw!r}: use an integer from 1 to {high}")
    return int(raw)


def _choice(request: Request, name: str, default: str, choices: tuple[str, ...]) -> str:
    value = request.query_params.get(name, default)
    if value not in choices:
        *rest, last = choices
        allowed = f"{', '.join(rest)} or {last}" if rest else last
        raise _BadRequest(name, f"{name}={value!r}: use {allowed}")
    return value


def create_app(
    engine: Engine, *, token: str | None = None, max_lag_seconds: float = 60.0
) -> Starlette:
    async def metrics(_: Request) -> Response:
        return Response(
            await prometheus_text(engine), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def healthz(_: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(_: Request) -> Response:
        problems = await engine.readiness(max_lag_seconds=max_lag_seconds)
        return _json({"ready": not problems, "problems": problems}, 503 if problems else 200)

    async def status(_: Request) -> Response:
        found: dict[str, Any] = {"mappings": [asdict(s) for s in await engine.status()]}
        if engine.config.bus is not None:  # scale-out: capture holders, workers, partitions
            found["scaleout"] = await engine.scaleout_figures()
        return _json(found)

    async def runs(request: Request) -> Response:
        limit = _int_param(request, "limit", 20, MAX_LIMIT)
        return _json({"runs": [asdict(r) for r in await engine.state.runs(limit=limit)]})

    async def dlq(request: Request) -> Response:
        status_ = request.query_params.get("status", "pending") or None
        letters = await engine.state.dead_letters(status=status_)
        return _json(
            {
                "dead_letters": [
                    {k: v for k, v in asdict(d).items() if k != "stack_trace"} for d in letters
                ]
            }
        )

    async def conflicts(request: Request) -> Response:
        """``?mapping=M&status=open|resolved&limit=N``: the latest conflicts, newest first,
        as ``vectorsync conflicts list --json``."""
        known = tuple(m.name for m in engine.config.mappings)
        mapping = (
            _choice(request, "mapping", "", known) if "mapping" in request.query_params else None
        )
        status_ = _choice(request, "status", "all", ("open", "resolved", "all"))
        limit = _int_param(request, "limit", 100, MAX_LIMIT)
        found = await engine.state.conflicts(
            mapping=mapping, status=None if status_ == "all" else status_, limit=limit
        )
        return _json({"conflicts": found})

    async def replay(request: Request) -> Response:
        letter = _bounded("id", request.path_params["id"], MAX_ID)
        count = await engine.replay_dead_letters([letter])
        return _json({"enqueued": count}, 202 if count else 404)

    one_check = asyncio.Lock()

    async def run_check(request: Request) -> Response:
        """Check now, inside this process (a qdrant-edge sink has one writer: a separate
        `vectorsync check` cannot open it while this server syncs).

        One check at a time: a check runs in the sync's event loop, so concurrent ones
        would starve the sync. While one runs, another request is refused at once with 429
        and Retry-After rather than queued (a queue would hold clients' connections open
        and still run every check they piled up)."""
        mode = _choice(request, "mode", "full", CHECK_MODES)
        known = tuple(m.name for m in engine.config.mappings)
        asked = "mapping" in request.query_params
        names = (_choice(request, "mapping", "", known),) if asked else known
        if one_check.locked():
            return _error(
                "a check is already running in this server: retry when it has finished",
                429,
                headers={"Retry-After": str(CHECK_RETRY_AFTER_SECONDS)},
            )
        repair = request.query_params.get("repair", "") in ("1", "true", "yes")
        sample_size = _int_param(request, "sample_size", 1000, MAX_SAMPLE)
        seed = _int_param(request, "seed", 0, MAX_ID) if "seed" in request.query_params else None
        async with one_check:
            entries = [
                await engine.check_and_repair(
                    name, mode=mode, repair=repair, sample_size=sample_size, seed=seed
                )
                for name in names
            ]
        final = [e.get("after", e["before"]) for e in entries]
        reports = [e["before"] for e in entries]
        return _json(
            {
                "checks": reports,
                "repairs": entries if repair else [],
                "consistent": all(r["consistent"] for r in final),
            }
        )

    async def search(request: Request) -> Response:
        """``?mapping=M&q=TEXT&limit=N&where=author=ann&where=published>=2025&vector=V&hybrid=1``:
        the hits with their keys, current texts and payloads (``vector``: the named vector
        searched, where the mapping has several)."""
        known = tuple(m.name for m in engine.config.mappings)
        default = known[0] if len(known) == 1 else ""
        mapping = _choice(request, "mapping", default, known)
        query = request.query_params.get("q", "")
        if not query.strip():
            raise _BadRequest("q", "q: give the text to search for")
        limit = _int_param(request, "limit", 5, MAX_LIMIT)
        where = request.query_params.getlist("where")
        vector = request.query_params.get("vector") or None
        hybrid = request.query_params.get("hybrid", "").lower() in ("1", "true", "yes")
        try:
            hits = await find(engine, mapping, query, limit, where, vector, hybrid)
        except ConfigError as exc:  # a filter that does not fit the mapping: the client's
            raise _BadRequest("where", str(exc)) from exc
        return _json({"mapping": mapping, "hits": hits})

    async def indexes(request: Request) -> Response:
        """Every index version (``?mapping=M`` for one mapping): state, collection, records,
        model, dimension, times and backfill progress, as ``vectorsync indexes --json``."""
        known = tuple(m.name for m in engine.config.mappings)
        asked = "mapping" in request.query_params
        mapping = _choice(request, "mapping", "", known) if asked else None
        return _json({"indexes": await engine.indexes(mapping)})

    async def run_maintain(request: Request) -> Response:
        """Each sink's housekeeping (``?mapping=M`` for one mapping), inside this process:
        a qdrant-edge sink has one writer. One at a time, as checks."""
        known = tuple(m.name for m in engine.config.mappings)
        asked = "mapping" in request.query_params
        mapping = _choice(request, "mapping", "", known) if asked else None
        if one_check.locked():
            return _error(
                "a check or maintenance is already running in this server: retry when it "
                "has finished",
                429,
                headers={"Retry-After": str(CHECK_RETRY_AFTER_SECONDS)},
            )
        async with one_check:
            return _json({"maintained": await engine.maintain(mapping)})

    async def checks(request: Request) -> Response:
        limit = _int_param(request, "limit", 20, MAX_LIMIT)
        return _json({"checks": await engine.state.checks(limit=limit)})

    async def stats(_: Request) -> Response:
        figures = await engine.stats()
        for s in figures["sources"].values():
            for name in ("latency", "batch_sizes"):
                h = s[name]
                s[name] = {"count": h.count, "sum": h.total, "buckets": h.cumulative()}
        return _json(figures)

    async def dashboard(_: Request) -> Response:
        page = resources.files("vectorsync").joinpath("dashboard.html").read_text()
        return HTMLResponse(page)

    return Starlette(
        routes=[
            Route("/", dashboard),
            Route("/metrics", metrics),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/api/status", status),
            Route("/api/runs", runs),
            Route("/api/dlq", dlq),
            Route("/api/dlq/{id}/replay", replay, methods=["POST"]),
            Route("/api/conflicts", conflicts),
            Route("/api/checks", checks),
            Route("/api/check", run_check, methods=["POST"]),
            Route("/api/maintain", run_maintain, methods=["POST"]),
            Route("/api/stats", stats),
            Route("/api/search", search),
            Route("/api/indexes", indexes),
        ],
        middleware=[Middleware(_Guard, token=token)],
        exception_handlers={_BadRequest: _bad_request, VectorsyncError: _failed},
    )


async def _bad_request(_: Request, exc: Exception) -> Response:
    parameter = exc.parameter if isinstance(exc, _BadRequest) else None
    return _error(str(exc), 400, parameter=parameter)


async def _failed(_: Request, exc: Exception) -> Response:
    return _error(str(exc), 503)


def _error(
    message: str, status_code: int, *, headers: dict[str, str] | None = None, **fields: Any
) -> Response:
    return _json({"error": message, **fields}, status_code, headers=headers)


def _json(value: Any, status_code: int = 200, *, headers: dict[str, str] | None = None) -> Response:
    """Every JSON body leaves through here: redacted (URL passwords, declared secrets),
    including values orjson only knows how to print."""
    import orjson

    body = orjson.dumps(
        redact_value(value),
        default=lambda v: redact(str(v)),
        option=orjson.OPT_NON_STR_KEYS,
    )
    return Response(body, status_code, headers=headers, media_type="application/json")
