"""The HTTP client against servers no one here wrote: nginx (Debian), uvicorn and hypercorn
(PyPI) serving a tiny ASGI app. Chunked and close-delimited answers, 100 Continue before
the answer, keep-alive reuse, every request arriving once and whole.

A relay between client and server counts connections and keeps the bytes the server sent,
so what went over the wire is checked, not only what the client made of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dispatcher import http1

from .helpers import free_port, missing_system_package

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 5  # per case, one after the other: all on one kept-alive connection


@dataclass
class Relay:
    """Forwards 127.0.0.1:port to the server; one `received` buffer per connection."""

    upstream: int
    port: int = 0
    received: list[bytearray] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = bytearray()
        self.received.append(seen)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: bytearray | None
        ) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if keep is not None:
                        keep += data
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer, None), pipe(up_reader, writer, seen))
        finally:
            writer.transport.abort()
            up_writer.transport.abort()


@contextlib.asynccontextmanager
async def relay(upstream: int) -> AsyncIterator[Relay]:
    r = Relay(upstream)
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        await r.serve(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    r.port = server.sockets[0].getsockname()[1]
    try:
        yield r
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, f"nothing listens on {port}: {log.read_text()}"
        time.sleep(0.02)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream app {{ server 127.0.0.1:{upstream}; keepalive 4; }}
    server {{
        listen 127.0.0.1:{port};
        location = /fixed {{ return 200 "ok"; }}
        location = /chunked {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        # No length and no chunks: the answer ends when nginx closes (HTTP/1.0 style).
        location = /close {{
            proxy_pass http://app/chunked;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            chunked_transfer_encoding off;
        }}
    }}
}}
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """uvicorn, hypercorn and nginx (in front of the uvicorn app), each stopped by its pid."""
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None:
        missing_system_package(
            "nginx is not installed: apt-get install -y --no-install-recommends nginx-light"
        )
    folder = tmp_path_factory.mktemp("interop")
    ports = {"uvicorn": free_port(), "hypercorn": free_port(), "nginx": free_port()}
    commands = {
        "uvicorn": [
            sys.executable, "-m", "uvicorn", "tests.asgi_echo:app", "--host", "127.0.0.1",
            "--port", str(ports["uvicorn"]), "--lifespan", "off", "--log-level", "warning",
        ],
        "hypercorn": [
            sys.executable, "-m", "hypercorn", "tests.asgi_echo:app",
            "--bind", f"127.0.0.1:{ports['hypercorn']}", "--log-level", "warning",
        ],
    }  # fmt: skip
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=folder, port=ports["nginx"], upstream=ports["uvicorn"]))
    commands["nginx"] = [
        nginx,
        "-p",
        str(folder),
        "-e",
        str(folder / "nginx-error.log"),
        "-c",
        str(conf),
    ]
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    try:
        for name, command in commands.items():
            log = folder / f"{name}.log"
            with log.open("wb") as out:
                procs[name] = (
                    subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT),
                    log,
                )
        for name, (proc, log) in procs.items():
            wait_listening(ports[name], proc, log)
        yield ports
    finally:
        for proc, _ in procs.values():
            stop(proc)


async def exchange(
    client: http1.Client, port: int, path: str, rid: str, *, expect: bool = False
) -> http1.Response:
    loop = asyncio.get_running_loop()
    headers = {"Content-Type": "application/json", "X-Id": rid}
    if expect:
        headers["Expect"] = "100-continue"
    body = b'{"id": "%s", "pad": "%s"}' % (rid.encode(), b"x" * 3000)
    return await client.request(
        "POST",
        client.target(f"http://127.0.0.1:{port}{path}"),
        headers,
        body,
        deadline=loop.time() + 5,
        connect_timeout=2,
        verify_tls=True,
        capture=4096,
    )


BODY_LEN = len(b'{"id": "%s", "pad": "%s"}' % (uuid.uuid4().hex.encode(), b"x" * 3000))


@pytest.mark.parametrize(
    ("server", "path", "framing"),
    [
        ("uvicorn", "/fixed", b"content-length"),
        ("uvicorn", "/chunked", b"transfer-encoding: chunked"),
        ("hypercorn", "/fixed", b"content-length"),
        ("hypercorn", "/chunked", b"transfer-encoding: chunked"),
        ("nginx", "/fixed", b"content-length"),
        ("nginx", "/chunked", b"transfer-encoding: chunked"),
        ("nginx", "/close", b"connection: close"),
    ],
)
async def test_answers_of_servers_we_did_not_write_are_read_whole_on_kept_alive_connections(
    servers: dict[str, int], server: str, path: str, framing: bytes
) -> None:
    async with relay(servers[server]) as wire:
        client = http1.Client(True)
        try:
            for _ in range(REQUESTS):
                rid = uuid.uuid4().hex
                response = await exchange(client, wire.port, path, rid)
                assert response.status == 200
                expected = b"ok" if path == "/fixed" and server == "nginx" else None
                assert response.body == (expected or f"{rid} seen 1 len {BODY_LEN}".encode())
        finally:
            await client.close()
    stream = bytes(wire.received[0]).lower()
    assert framing in stream, stream[:400]
    if path == "/close":
        # Close-delimited: a connection per request, no length, no chunks.
        assert len(wire.received) == REQUESTS
        assert b"content-length" not in stream
        assert b"chunked" not in stream
    else:
        assert len(wire.received) == 1, "every request on one kept-alive connection"
        assert stream.count(b"http/1.1 200") == REQUESTS


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
async def test_a_100_continue_before_the_answer_is_passed_over(
    servers: dict[str, int], server: str
) -> None:
    async with relay(servers[server]) as wire:
        client = http1.Client(True)
        try:
            for _ in range(2):
                rid = uuid.uuid4().hex
                response = await exchange(client, wire.port, "/fixed", rid, expect=True)
                assert (response.status, response.body) == (
                    200,
                    f"{rid} seen 1 len {BODY_LEN}".encode(),
                )
        finally:
            await client.close()
    stream = bytes(wire.received[0])
    assert stream.count(b"HTTP/1.1 100 ") == 2, stream[:300]  # hypercorn: no reason phrase
    assert len(wire.received) == 1
