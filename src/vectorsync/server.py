"""The HTTP side: Prometheus metrics, health and readiness probes, a JSON API and the
dashboard. Bound to 127.0.0.1 by default; any other address requires a bearer token."""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import asdict
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .engine import Engine
from .errors import ConfigError, VectorsyncError
from .metrics import prometheus_text

__all__ = ["create_app", "require_token"]


def require_token(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token (the API can replay dead letters)."""
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback and not token:
        raise ConfigError(
            f"http: serving on {host!r} requires a bearer token; set [http] token "
            "(or VECTORSYNC_HTTP__TOKEN), or bind to 127.0.0.1"
        )


class _BearerToken(BaseHTTPMiddleware):
    def __init__(self, app: Any, token: str) -> None:
        super().__init__(app)
        self._expected = f"Bearer {token}".encode()

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        given = request.headers.get("authorization", "").encode()
        if request.url.path != "/healthz" and not hmac.compare_digest(given, self._expected):
            return JSONResponse(
                {"error": "missing or wrong bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await call_next(request)


def create_app(
    engine: Engine, *, token: str | None = None, max_lag_seconds: float = 60.0
) -> Starlette:
    async def metrics(_: Request) -> Response:
        return Response(
            await prometheus_text(engine), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        problems = await engine.readiness(max_lag_seconds=max_lag_seconds)
        return JSONResponse(
            {"ready": not problems, "problems": problems}, status_code=503 if problems else 200
        )

    async def status(_: Request) -> Response:
        return JSONResponse({"mappings": [asdict(s) for s in await engine.status()]})

    async def runs(request: Request) -> Response:
        limit = int(request.query_params.get("limit", "20"))
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

    async def replay(request: Request) -> Response:
        count = await engine.replay_dead_letters([int(request.path_params["id"])])
        return JSONResponse({"enqueued": count}, status_code=202 if count else 404)

    async def run_check(request: Request) -> Response:
        """Check now, inside this process (a qdrant-edge sink has one writer: a separate
        `vectorsync check` cannot open it while this server syncs)."""
        mode = request.query_params.get("mode", "full")
        only = request.query_params.get("mapping")
        names = [only] if only else [m.name for m in engine.config.mappings]
        reports = [(await engine.check(name, mode=mode)).as_dict() for name in names]
        return _json({"checks": reports, "consistent": all(r["consistent"] for r in reports)})

    async def checks(request: Request) -> Response:
        limit = int(request.query_params.get("limit", "20"))
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

    async def failed(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=503)

    middleware = [Middleware(_BearerToken, token=token)] if token else []
    return Starlette(
        routes=[
            Route("/", dashboard),
            Route("/metrics", metrics),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/api/status", status),
            Route("/api/runs", runs),
            Route("/api/dlq", dlq),
            Route("/api/dlq/{id:int}/replay", replay, methods=["POST"]),
            Route("/api/checks", checks),
            Route("/api/check", run_check, methods=["POST"]),
            Route("/api/stats", stats),
        ],
        middleware=middleware,
        exception_handlers={VectorsyncError: failed},
    )


def _json(value: Any) -> Response:
    import orjson

    body = orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)
    return Response(body, media_type="application/json")
