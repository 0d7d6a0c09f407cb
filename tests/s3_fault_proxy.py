"""A fault-injecting reverse proxy for S3 on loopback (test infrastructure, not product code).

`S3FaultProxy` forwards every request to an upstream S3 server (moto's, in the tests) and, at a
configured rate, answers in its place with one fault:

- ``error500``: HTTP 500 ``InternalError`` (S3's XML error body);
- ``error503``: HTTP 503 ``ServiceUnavailable``;
- ``slowdown``: HTTP 503 ``SlowDown`` ("Please reduce your request rate.");
- ``reset``: the connection is closed without an answer (the request is not forwarded);
- ``slow``: the answer is delayed by ``slow_seconds`` (then forwarded as is);
- ``truncate``: a GET's answer promises the whole body (``Content-Length``) and the connection
  closes after half of it (requests without a body to cut get ``reset`` instead).

Injection is deterministic given the seed: whether (and how) a request is faulted depends only on
the seed, the request (method, path, query without upload ids) and how many times that request was
seen before, never on the arrival order of other requests. A request is faulted at most
``max_in_a_row`` times in a row, so a client that retries more often always gets through.

``outage`` (or `outage_after`) answers every request with ``SlowDown`` until it is switched off.
``counts`` counts each injected fault by kind, ``requests`` every request seen, ``retries`` the
requests that repeated a faulted one (a client's retry), ``retries_by`` those retries by the client
that made them — ``botocore`` when the request says it is a later attempt of the same call
(botocore's ``amz-sdk-request: attempt=N`` header, N > 1), ``s3fs`` when it is a new call (s3fs's
own retry round, or the caller's) — and ``seen`` each request key.

Runs its own event loop in a daemon thread: ``with S3FaultProxy(upstream, rate=0.1) as proxy:``
then point the client at ``proxy.url``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections import Counter
from urllib.parse import parse_qsl, urlencode

import aiohttp
from aiohttp import web

KINDS = ("error500", "error503", "slowdown", "reset", "slow", "truncate")
ERRORS = {
    "error500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "error503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "proxy-connection", "upgrade", "te", "trailer"}
VOLATILE_QUERY = {"uploadId", "x-id"}


def error_body(code: str, message: str, resource: str) -> bytes:
    """S3's XML error document."""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<Resource>{resource}</Resource><RequestId>fault-proxy</RequestId></Error>"
    ).encode()


class S3FaultProxy:
    """A reverse proxy to ``upstream`` injecting faults into a share ``rate`` of the requests."""

    def __init__(self, upstream: str, *, rate: float = 0.0, seed: int = 0, kinds: tuple[str, ...] = KINDS, slow_seconds: float = 1.0,
                 max_in_a_row: int = 2) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        self.upstream = upstream.rstrip("/")
        self.rate, self.seed, self.kinds, self.slow_seconds, self.max_in_a_row = rate, seed, tuple(kinds), slow_seconds, max_in_a_row
        self.outage = False
        self.counts: Counter[str] = Counter()
        self.seen: Counter[str] = Counter()
        self.requests = 0
        self.retries_by: Counter[str] = Counter()
        self._in_a_row: Counter[str] = Counter()
        self._trigger: tuple[str, re.Pattern, int] | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    # -- control -------------------------------------------------------------------------------

    def outage_after(self, method: str, path_pattern: str, count: int = 1) -> None:
        """Start the outage once ``count`` requests ``method`` on a path matching ``path_pattern``
        were forwarded successfully (e.g. after the first part of a stage was written)."""
        with self._lock:
            self._trigger = (method.upper(), re.compile(path_pattern), count)

    def forwarded(self, method: str, path_pattern: str) -> int:
        """How many requests ``method`` on a path matching ``path_pattern`` were seen."""
        pattern = re.compile(path_pattern)
        with self._lock:
            return sum(n for key, n in self.seen.items() if key.startswith(f"{method.upper()} ") and pattern.search(key.split(" ", 1)[1]))

    def start(self) -> str:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="s3-fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the S3 fault proxy did not start")
        return self.url

    def stop(self) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop = None

    def __enter__(self) -> S3FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def retries(self) -> int:
        """Every client's retries together."""
        return self.report()["retries"]

    def report(self) -> dict:
        """The figures: requests seen, faults injected by kind, retries seen in all and by client."""
        with self._lock:
            return {"requests": self.requests, "faults": dict(sorted(self.counts.items())), "injected": sum(self.counts.values()),
                    "retries": sum(self.retries_by.values()), "retries_by": dict(sorted(self.retries_by.items()))}

    # -- the decision ----------------------------------------------------------------------------

    @staticmethod
    def key(method: str, path: str, query: str) -> str:
        stable = sorted((name, value) for name, value in parse_qsl(query, keep_blank_values=True) if name not in VOLATILE_QUERY)
        return f"{method} {path}" + (f"?{urlencode(stable)}" if stable else "")

    def decide(self, key: str, attempt: int) -> str | None:
        """The fault for the ``attempt``-th sighting of request ``key`` (None: forward it)."""
        digest = hashlib.sha256(f"{self.seed}|{key}|{attempt}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 >= self.rate:
            return None
        return self.kinds[int.from_bytes(digest[8:12], "big") % len(self.kinds)]

    @staticmethod
    def sdk_attempt(header: str) -> int:
        """The attempt number botocore writes in ``amz-sdk-request`` (``attempt=2; max=5``); 1 without it."""
        found = re.search(r"attempt=(\d+)", header)
        return int(found.group(1)) if found else 1

    def _next_fault(self, method: str, path: str, query: str, sdk_request: str) -> tuple[str, str | None]:
        key = self.key(method, path, query)
        with self._lock:
            self.requests += 1
            attempt = self.seen[key]
            self.seen[key] += 1
            if self._in_a_row[key]:
                self.retries_by["botocore" if self.sdk_attempt(sdk_request) > 1 else "s3fs"] += 1
            if self.outage:
                self.counts["outage"] += 1
                self._in_a_row[key] += 1
                return key, "outage"
            fault = self.decide(key, attempt) if self._in_a_row[key] < self.max_in_a_row else None
            if fault == "truncate" and method != "GET":
                fault = "reset"
            if fault is None or fault == "slow":
                self._in_a_row[key] = 0
            else:
                self._in_a_row[key] += 1
            if fault is not None and fault != "truncate":  # a truncation is counted once there is a body to cut
                self.counts[fault] += 1
            return key, fault

    def _after_success(self, method: str, path: str) -> None:
        with self._lock:
            if self._trigger is not None:
                trigger_method, pattern, count = self._trigger
                if method == trigger_method and pattern.search(path):
                    count -= 1
                    self._trigger = (trigger_method, pattern, count) if count > 0 else None
                    if count <= 0:
                        self.outage = True

    # -- the server ------------------------------------------------------------------------------

    def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        app = web.Application(client_max_size=1 << 34)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=600))

    async def _shutdown(self) -> None:
        await self._session.close()
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        key, fault = self._next_fault(request.method, request.path, request.query_string, request.headers.get("amz-sdk-request", ""))
        if fault in ("outage", "error500", "error503", "slowdown"):
            status, code, message = ERRORS["slowdown" if fault == "outage" else fault]
            await request.read()
            return web.Response(status=status, body=error_body(code, message, request.path), content_type="application/xml")
        if fault == "reset":
            request.transport.abort()
            return web.Response(status=500)  # never sent: the connection is gone
        if fault == "slow":
            await asyncio.sleep(self.slow_seconds)
        body = await request.read()
        headers = {name: value for name, value in request.headers.items() if name.lower() not in HOP_BY_HOP}
        headers["Host"] = request.headers.get("Host", "")
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers, data=body,
                                         allow_redirects=False) as upstream:
            payload = await upstream.read()
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            length = upstream.headers.get("Content-Length")
            response.content_length = int(length) if length is not None else len(payload)
        if fault == "truncate" and len(payload) >= 2:
            with self._lock:
                self.counts["truncate"] += 1
            await response.prepare(request)
            await response.write(payload[: len(payload) // 2])
            request.transport.abort()
            return response
        if fault == "truncate":  # nothing to cut: forwarded whole, and not a fault
            with self._lock:
                self._in_a_row[key] = 0
        await response.prepare(request)
        if request.method != "HEAD":
            await response.write(payload)
        await response.write_eof()
        if upstream.status < 300:
            self._after_success(request.method, request.path)
        return response
