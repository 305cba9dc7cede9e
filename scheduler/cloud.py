"""The cloud tier: any OpenAI-compatible server (vLLM, llama.cpp, another edge-llm) behind us.

Requests and streams are proxied as they are; a tier that errors (5xx, connection, timeout)
is marked down for a while so the router sends new requests elsewhere.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from scheduler.errors import ApiError
from scheduler.measure import TierLatency


class CloudUnavailable(Exception):
    """The cloud tier failed before sending anything; the caller may fail over to the edge."""


@dataclass(frozen=True)
class CloudSettings:
    url: str  # base URL up to and including /v1
    model: str | None = None  # model name there (default: the request's)
    api_key: str | None = None
    timeout: float = 600.0
    down_for: float = 30.0


class CloudTier:
    """Proxies one request at a time to the cloud; owns its client session (closed in `aclose`)."""

    def __init__(self, settings: CloudSettings, latency: TierLatency | None = None):
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self.down_until = 0.0
        self.latency = latency or TierLatency()  # measured on every streamed answer
        self.rtt: float | None = None

    async def probe(self, timeout: float = 5.0) -> None:
        """Measure the round trip with GET /models (a request that generates nothing); a cloud that
        does not answer is marked down."""
        auth = {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        began = time.perf_counter()
        try:
            async with self._client().get(f"{self.settings.url.rstrip('/')}/models", headers=auth,
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                await r.read()
        except (TimeoutError, aiohttp.ClientError):
            self.mark_down()
            return
        self.rtt = time.perf_counter() - began
        if self.latency.ttft.value is None:
            self.latency.ttft.add(self.rtt)  # a lower bound until a real answer is measured

    @property
    def up(self) -> bool:
        return time.monotonic() >= self.down_until

    def mark_down(self) -> None:
        self.down_until = time.monotonic() + self.settings.down_for

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.timeout))
        return self._session

    async def forward(self, request: web.Request, path: str, body: dict,
                      headers: dict[str, str]) -> web.StreamResponse:
        """Send `body` to the cloud and relay its answer (SSE bytes as they come); raises CloudUnavailable."""
        body = dict(body) | ({"model": self.settings.model} if self.settings.model else {})
        auth = {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        began = time.perf_counter()
        try:
            upstream = await self._client().post(f"{self.settings.url.rstrip('/')}{path}", json=body,
                                                 headers=auth)
        except (TimeoutError, aiohttp.ClientError) as e:
            self.mark_down()
            raise CloudUnavailable(f"cloud tier unreachable: {e}") from e
        async with upstream:
            if upstream.status >= 500:
                self.mark_down()
                raise CloudUnavailable(f"cloud tier answered {upstream.status}")
            if upstream.status >= 400:
                raise ApiError(upstream.status, f"cloud tier refused the request: {await upstream.text()}",
                               "upstream_error")
            return await self._relay(request, upstream, headers, began)

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse,
                     headers: dict[str, str], began: float) -> web.StreamResponse:
        """Relay the answer; a streamed one also measures the cloud's TTFT and time between tokens."""
        content_type = upstream.headers.get("Content-Type", "application/json")
        response = web.StreamResponse(status=upstream.status, headers={"Content-Type": content_type, **headers})
        await response.prepare(request)
        streamed, last = content_type.startswith("text/event-stream"), None
        try:
            async for chunk in upstream.content.iter_any():
                now = time.perf_counter()
                if streamed and last is None:
                    self.latency.ttft.add(now - began)
                elif streamed:
                    self.latency.tpot.add(now - last)
                last = now
                await response.write(chunk)
        except (TimeoutError, aiohttp.ClientError) as e:  # output already went out: end clearly
            self.mark_down()
            error = f'data: {{"error": {{"message": "the cloud tier failed mid-stream: {type(e).__name__}", ' \
                    '"type": "service_unavailable", "param": null, "code": "cloud_failed"}}\n\ndata: [DONE]\n\n'
            await response.write(error.encode())
        await response.write_eof()
        return response

    async def stream_completion(self, body: dict) -> AsyncIterator[tuple[str, str | None]]:
        """Stream a /completions request and yield (text, finish_reason) per chunk.

        Used to migrate a request that lost the edge mid-stream; raises CloudUnavailable.
        """
        body = body | {"stream": True} | ({"model": self.settings.model} if self.settings.model else {})
        auth = {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        try:
            async with self._client().post(f"{self.settings.url.rstrip('/')}/completions", json=body,
                                           headers=auth) as upstream:
                if upstream.status != 200:
                    raise CloudUnavailable(f"cloud tier answered {upstream.status}")
                async for line in upstream.content:
                    text = line.decode().strip()
                    if not text.startswith("data: ") or text == "data: [DONE]":
                        continue
                    choices = json.loads(text[6:]).get("choices") or [{}]
                    yield choices[0].get("text", ""), choices[0].get("finish_reason")
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
            self.mark_down()
            raise CloudUnavailable(f"cloud tier failed: {e}") from e

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
