"""The bench's receiver: a raw asyncio HTTP/1.1 server in its own process, so that what it
costs per request (a few microseconds of parsing and one write) does not dilute the
difference between the daemon's client path and the plain aiohttp client.

The aiohttp server it replaces cost 70-100 us of CPU per request, about as much as the
client side being measured: every ratio against the ceiling was pulled towards 1. Here
httptools parses (the C parser aiohttp and uvicorn use), the protocol answers from
prebuilt bytes, and nothing else runs per request but a counter.

The first path segment picks the behaviour: /ok 200, /fail 500, /hang answers only after
HANG_SECONDS (the sender times out first), /slow answers after 2 s, /flaky answers 500 to the
first attempt of each message (by webhook-id) and 200 to the next. Keep-alive as HTTP/1.1
says; pipelined requests are answered in order.

It also keeps, for 2xx answers, the monotonic time of the first request's arrival, of the
last answer, and answers per 100 ms; the bench reads and resets them with GET /_stats and
POST /_reset. CLOCK_MONOTONIC is one clock for every process on Linux, so these times
compare with the bench's own `time.monotonic()`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from multiprocessing.queues import Queue

import httptools
import orjson

HANG_SECONDS = 30.0  # a hanging endpoint answers after this (the subscription times out first)
SLOW_SECONDS = 2.0
BUCKET_SECONDS = 0.1  # resolution of the answers-per-interval series


def _response(status: bytes, body: bytes, *, close: bool = False) -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\n"
    head += b"Content-Length: " + str(len(body)).encode() + b"\r\n"
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


OK = _response(b"200 OK", b"ok")
FAIL = _response(b"500 Internal Server Error", b"no")
NOT_YET = _response(b"500 Internal Server Error", b"not yet")
NOT_FOUND = _response(b"404 Not Found", b"")
BAD = _response(b"400 Bad Request", b"", close=True)


class Stats:
    """2xx answers since the last reset: how many, when the first request arrived, when the
    last answer left, and how many answers left in each 100 ms (keyed by monotonic bucket)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.answered = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.buckets: Counter[int] = Counter()

    def arrived(self, now: float) -> None:
        if self.first_at is None:
            self.first_at = now

    def answered_ok(self, now: float) -> None:
        self.answered += 1
        self.last_at = now
        self.buckets[int(now / BUCKET_SECONDS)] += 1

    def as_json(self) -> bytes:
        return orjson.dumps(
            {
                "answered": self.answered,
                "first_at": self.first_at,
                "last_at": self.last_at,
                "bucket_seconds": BUCKET_SECONDS,
                "buckets": sorted(self.buckets.items()),
            }
        )


class Receiver(asyncio.Protocol):
    """One connection. Answers are queued in request order: a delayed one (/slow, /hang)
    holds back what was pipelined behind it, as HTTP/1.1 requires."""

    def __init__(self, stats: Stats, flaky: set[str]) -> None:
        self._stats = stats
        self._flaky = flaky
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._webhook_id = b""
        self._arrived = 0.0
        # Answers not yet written, in request order (None: not ready), and whether they count.
        self._queue: list[tuple[bytes, bool] | None] = []
        self._timers: list[asyncio.TimerHandle] = []
        self._closing = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have its methods.
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._closing = True
            self._push(BAD)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self._timers:
            timer.cancel()
        self._transport = None

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._webhook_id = b""
        self._arrived = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"webhook-id":
            self._webhook_id = value

    def on_message_complete(self) -> None:
        if not self._parser.should_keep_alive():
            self._closing = True
        path = self._url.split(b"?", 1)[0]
        if not path.startswith(b"/_"):
            self._stats.arrived(self._arrived)
        parts = path.split(b"/", 2)
        kind = parts[1] if len(parts) > 1 else b""
        if kind == b"ok":
            self._push(OK)
        elif kind == b"fail":
            self._push(FAIL)
        elif kind == b"flaky":
            msg = self._webhook_id.decode("latin-1")
            if msg in self._flaky:
                self._flaky.discard(msg)
                self._push(OK)
            else:
                self._flaky.add(msg)
                self._push(NOT_YET)
        elif kind in (b"hang", b"slow"):
            self._later(HANG_SECONDS if kind == b"hang" else SLOW_SECONDS, OK)
        elif path == b"/_stats":
            self._push(_response(b"200 OK", self._stats.as_json()), counted=False)
        elif path == b"/_reset":
            self._stats.reset()
            self._push(_response(b"200 OK", b"reset"), counted=False)
        else:
            self._push(NOT_FOUND, counted=False)

    # answering

    def _push(self, answer: bytes, *, counted: bool = True) -> None:
        self._queue.append((answer, counted))
        self._flush()

    def _later(self, delay: float, answer: bytes) -> None:
        self._queue.append(None)
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(delay, self._fill, answer))

    def _fill(self, answer: bytes) -> None:
        # Every delayed answer is the same bytes, so the oldest open slot takes it.
        for i, queued in enumerate(self._queue):
            if queued is None:
                self._queue[i] = (answer, True)
                break
        self._flush()

    def _flush(self) -> None:
        transport = self._transport
        while self._queue and self._queue[0] is not None:
            item = self._queue.pop(0)
            assert item is not None
            answer, counted = item
            if transport is None:
                continue
            transport.write(answer)
            if counted and answer[9:10] == b"2":
                self._stats.answered_ok(time.monotonic())
        if self._closing and not self._queue and transport is not None:
            transport.close()


def serve(ports: Queue[int]) -> None:
    """The receiver process's main: listen on 127.0.0.1 (a free port, sent back on `ports`)
    and serve until terminated."""
    import uvloop

    stats = Stats()
    flaky: set[str] = set()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Receiver(stats, flaky), "127.0.0.1", 0, backlog=4096
        )
        ports.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    uvloop.run(main())
