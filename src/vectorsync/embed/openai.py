"""An embedder for any OpenAI-compatible ``/v1/embeddings`` endpoint (OpenAI, Azure, Ollama,
vLLM, Hugging Face TEI, LiteLLM, Infinity), through the official ``openai`` client.

What it does about the endpoint's limits:

* requests carry at most ``batch_size`` texts and ``max_batch_tokens`` tokens; up to
  ``concurrency`` of them are in flight at once;
* a client-side limiter keeps requests and tokens in *every* 60-second window under
  ``requests_per_minute`` / ``tokens_per_minute`` (a moving window, not a leaky bucket: a
  bucket lets a burst through on top of the rate);
* a 429 waits for ``Retry-After`` (or a backoff when the server gives none) and tries again:
  it costs time, never a record; 5xx, timeouts and connection errors raise a
  :class:`~vectorsync.errors.RetryableError`, which the sync retries with backoff as one
  error incident; a 400 raises :class:`~vectorsync.errors.EmbeddingError`, so the sync finds
  the one text the endpoint rejects and dead-letters that record alone; 401/403 stop the run
  with the config field of the key named.

Tokens are counted with the model's tokenizer where one is known (``tokenizer``: a local
folder with a ``tokenizer.json``, or tiktoken's encoding for OpenAI model names when its
files are available offline), else estimated as one token per 4 characters, rounded up.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

from .._tasks import gather_or_fail
from ..errors import ConfigError, EmbeddingError, RetryableError
from ..sinks.base import Distance
from .tokens import TokenCounter

__all__ = ["OpenAIEmbedder", "TokenCounter"]

logger = logging.getLogger(__name__)

_RATE_WINDOW = 61.0  # seconds: the limits are per minute, with a second for network jitter
_MAX_429_WAIT = 60.0  # a Retry-After longer than this is capped (and the request retried)


class _MovingWindow:
    """At most ``limit`` units (requests, tokens) in any window of ``_RATE_WINDOW`` seconds;
    :meth:`acquire` waits for room. A log of (time, amount) grants, so a token limit costs
    one entry per request (the ``limits`` library's moving window keeps one entry per unit:
    a million-token limit would mean a million-entry list)."""

    def __init__(self, what: str, limit: int) -> None:
        self.what, self.limit = what, limit
        self._granted: deque[tuple[float, int]] = deque()
        self._used = 0
        self._lock = asyncio.Lock()  # first come, first served

    async def acquire(self, amount: int) -> None:
        if amount > self.limit:
            raise EmbeddingError(
                f"one request needs {amount} {self.what}, over the limit of {self.limit} per "
                "minute: lower batch_size / max_batch_tokens or raise the limit"
            )
        async with self._lock:
            while True:
                now = time.monotonic()
                while self._granted and self._granted[0][0] <= now - _RATE_WINDOW:
                    self._used -= self._granted.popleft()[1]
                if self._used + amount <= self.limit:
                    self._granted.append((now, amount))
                    self._used += amount
                    return
                # wait until enough of the oldest grants leave the window
                freed, until = self._used + amount - self.limit, now
                for at, n in self._granted:
                    freed -= n
                    until = at + _RATE_WINDOW
                    if freed <= 0:
                        break
                await asyncio.sleep(max(0.001, until - now))


class OpenAIEmbedder:
    distance: Distance = "cosine"

    def __init__(
        self,
        name: str,
        *,
        url: str,
        model: str,
        api_key: str | None = None,
        api_key_field: str = "api_key",
        dimensions: int | None = None,
        batch_size: int = 64,
        max_batch_tokens: int = 300_000,
        max_input_tokens: int | None = None,
        truncate: Literal["model", "error"] = "model",
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        concurrency: int = 4,
        timeout: float = 60.0,
        price_per_million_tokens: float | None = None,
        tokenizer: str | None = None,
    ) -> None:
        self.name, self.url, self.model = name, url, model
        self._api_key, self._api_key_field = api_key, api_key_field
        self._dimensions = dimensions
        self.request_size = batch_size
        self.batch_size = batch_size * concurrency  # what the sync hands over per call
        self.max_batch_tokens, self.max_input_tokens = max_batch_tokens, max_input_tokens
        self.truncate = truncate
        self.concurrency, self.timeout = concurrency, timeout
        self.price_per_million_tokens = price_per_million_tokens
        self._tokenizer = tokenizer
        self._requests = (
            _MovingWindow("requests", requests_per_minute) if requests_per_minute else None
        )
        self._tokens = _MovingWindow("tokens", tokens_per_minute) if tokens_per_minute else None
        self._slots = asyncio.Semaphore(concurrency)
        self._client: Any = None
        self.counter: TokenCounter | None = None
        self.model_id = f"openai:{model}" + (f"/{dimensions}" if dimensions else "")
        self.dimension = dimensions or 0
        self.texts_embedded = 0
        self.tokens_used = 0
        self.texts_truncated = 0
        self.rate_limited = 0  # 429s waited out

    @property
    def cost(self) -> float | None:
        """What the tokens sent so far cost, when the embedder has a price."""
        if self.price_per_million_tokens is None:
            return None
        return self.tokens_used * self.price_per_million_tokens / 1e6

    async def open(self) -> None:
        """Make the client and learn the dimension with one probe request (the model's, or
        the ``dimensions`` asked for)."""
        try:
            import openai
        except ImportError as exc:
            raise ConfigError(
                f"embedder {self.name!r} (kind 'openai') needs the openai client: "
                "pip install 'vectorsync[openai]'"
            ) from exc
        self.counter = TokenCounter(self.model, self._tokenizer)
        self._client = openai.AsyncOpenAI(
            base_url=self.url,
            api_key=self._api_key or "none",  # local servers take any key
            max_retries=0,  # the retry policy is ours (see the module docstring)
            timeout=self.timeout,
        )
        try:
            [probe], _ = await self._request(["dimension probe"])
        except BaseException:
            await self.close()  # the caller never closes what failed to open
            raise
        if self._dimensions and len(probe) != self._dimensions:
            raise ConfigError(
                f"embedder {self.name!r}: asked for dimensions={self._dimensions}, the endpoint "
                f"returned {len(probe)}-dimensional vectors; remove dimensions or use a model "
                "that can shorten its vectors"
            )
        self.dimension = len(probe)
        logger.info(
            "embedder %s: %s at %s, %d dimensions, tokens counted by %s",
            self.name,
            self.model,
            self.url,
            self.dimension,
            self.counter.kind,
            extra={"action": "embedder_open", "model": self.model_id},
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors, _ = await self.embed_metered(texts)
        return vectors

    async def embed_metered(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """Vectors of ``texts`` in order, and the tokens billed. Hand it many texts at once:
        they are sorted by tokens (longest first), so each request holds texts of about one
        length and the server pads little (an unsorted request pads every text to its
        longest: bench/bench_openai.py), cut into requests, and sent ``concurrency`` at a
        time; the vectors come back in the order of ``texts``."""
        prepared = [self._fit(t) for t in texts]
        order = sorted(range(len(prepared)), key=lambda i: -prepared[i][1])
        groups = self._requests_for([prepared[i] for i in order])
        tasks = [
            asyncio.create_task(self._request([t for t, _ in g], [n for _, n in g])) for g in groups
        ]
        await gather_or_fail(tasks)  # one failed request cancels the others: none runs on
        self.texts_embedded += len(texts)
        used = sum(task.result()[1] for task in tasks)
        vectors: list[list[float]] = [[] for _ in texts]
        sent = (vector for task in tasks for vector in task.result()[0])
        for i, vector in zip(order, sent, strict=True):
            vectors[i] = vector
        return vectors, used

    def _fit(self, text: str) -> tuple[str, int]:
        """The text as sent, and its tokens: cut to the model's window or refused."""
        assert self.counter is not None
        tokens = self.counter.count(text)
        limit = self.max_input_tokens
        if limit is None or tokens <= limit:
            return text, tokens
        if self.truncate == "error":
            raise EmbeddingError(
                f"text has {tokens} tokens, over the model's {limit} (max_input_tokens); "
                'shorten it or set truncate = "model"'
            )
        self.texts_truncated += 1
        cut = self.counter.cut(text, limit)
        return cut, self.counter.count(cut)

    def _requests_for(self, prepared: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
        """Consecutive groups of at most ``request_size`` texts and ``max_batch_tokens``."""
        groups: list[list[tuple[str, int]]] = []
        current: list[tuple[str, int]] = []
        tokens = 0
        for text, n in prepared:
            if current and (
                len(current) >= self.request_size or tokens + n > self.max_batch_tokens
            ):
                groups.append(current)
                current, tokens = [], 0
            current.append((text, n))
            tokens += n
        if current:
            groups.append(current)
        return groups

    async def _request(
        self, texts: Sequence[str], counts: Sequence[int] | None = None
    ) -> tuple[list[list[float]], int]:
        """One request: the vectors in the order of ``texts``, and the tokens billed;
        ``counts`` are the texts' tokens when the caller has counted them already."""
        import openai

        assert self.counter is not None
        tokens = sum(counts) if counts is not None else sum(map(self.counter.count, texts))
        waited = 0
        async with self._slots:
            while True:
                if self._requests is not None:
                    await self._requests.acquire(1)
                if self._tokens is not None:
                    await self._tokens.acquire(tokens)
                try:
                    response = await self._client.embeddings.create(
                        input=list(texts),
                        model=self.model,
                        encoding_format="float",
                        **({"dimensions": self._dimensions} if self._dimensions else {}),
                    )
                except openai.RateLimitError as exc:
                    waited += 1
                    self.rate_limited += 1
                    delay = _retry_after(exc.response.headers, waited)
                    logger.info(
                        "embedder %s: rate limited (429), waiting %.1fs as the endpoint asks",
                        self.name,
                        delay,
                        extra={"action": "rate_limited", "model": self.model_id},
                    )
                    await asyncio.sleep(delay)
                    continue
                except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                    raise ConfigError(
                        f"embedder {self.name!r}: the endpoint {self.url} refused the key "
                        f"(HTTP {exc.status_code}); set embedders.{self.name}."
                        f"{self._api_key_field} to a valid key"
                    ) from exc
                except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                    raise EmbeddingError(
                        f"{self.url} rejected the text (HTTP {exc.status_code}): {_message(exc)}"
                    ) from exc
                except openai.APIStatusError as exc:
                    raise RetryableError(
                        f"embedder {self.name!r}: {self.url} answered HTTP {exc.status_code}: "
                        f"{_message(exc)}"
                    ) from exc
                except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                    kind = "timed out" if isinstance(exc, openai.APITimeoutError) else "failed"
                    raise RetryableError(
                        f"embedder {self.name!r}: the request to {self.url} {kind} "
                        f"({type(exc).__name__}: {exc}); is the server up?"
                    ) from exc
                break
        data = sorted(response.data, key=lambda d: d.index)
        if len(data) != len(texts):
            raise RetryableError(
                f"embedder {self.name!r}: {self.url} returned {len(data)} vectors for "
                f"{len(texts)} texts"
            )
        usage = getattr(response, "usage", None)
        used = getattr(usage, "prompt_tokens", None) or tokens
        self.tokens_used += used  # billed, whether or not the rest of the call succeeds
        return [[float(x) for x in d.embedding] for d in data], used


def _retry_after(headers: Any, attempt: int) -> float:
    """Seconds to wait after a 429: the server's ``Retry-After`` (seconds or
    ``retry-after-ms``), else an exponential backoff with jitter."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = headers.get(name) if headers is not None else None
        if raw:
            try:
                return min(_MAX_429_WAIT, max(0.0, float(raw) / scale))
            except ValueError:
                continue  # an HTTP date: fall back to the backoff
    return random.uniform(0, min(_MAX_429_WAIT, 0.5 * 2**attempt))


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        detail = body.get("error", body.get("detail", body))
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
        return str(detail)[:500]
    return str(exc)[:500]
