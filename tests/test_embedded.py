"""The embedded PostgreSQL: a fresh machine needs nothing else, and no server is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from dispatcher.embedded import EmbeddedPostgres

from .helpers import free_port


@pytest.fixture
def base_dir() -> Iterator[Path]:
    # Short and outside pytest's tmp_path: the socket path must stay under 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="disp-emb-"))
    try:
        yield path
    finally:
        pid_file = path / "pgdata" / "postmaster.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().split("\n", 1)[0])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(path, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}").exists()
        and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    )


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still running"
        time.sleep(0.05)


def test_a_second_start_reuses_the_server_and_the_last_exit_stops_it(base_dir: Path) -> None:
    first = EmbeddedPostgres(base_dir)
    first.start()
    pid = first.server_pid()
    assert pid is not None
    script = textwrap.dedent(f"""
        from pathlib import Path
        from dispatcher import logs
        from dispatcher.embedded import EmbeddedPostgres
        logs.configure("json", "warning")
        e = EmbeddedPostgres(Path({str(base_dir)!r}))
        e.start()
        print(e.server_pid(), flush=True)
        e.stop()
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert int(out.stdout.strip()) == pid, "the second process joined the running server"
    assert alive(pid), "the server outlives a process that did not start it alone"
    first.stop()
    wait_gone(pid)


def test_a_server_orphaned_by_kill_9_is_adopted_and_stopped(base_dir: Path) -> None:
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from dispatcher import logs
        from dispatcher.embedded import EmbeddedPostgres
        logs.configure("json", "warning")
        e = EmbeddedPostgres(Path({str(base_dir)!r}))
        e.start()
        print(e.server_pid(), flush=True)
        time.sleep(120)
    """)
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            pid = int(proc.stdout.readline())
        finally:
            proc.kill()
            proc.wait(10)
    assert alive(pid), "kill -9 of the daemon leaves its server running"
    adopter = EmbeddedPostgres(base_dir)
    adopter.start()
    assert adopter.server_pid() == pid
    adopter.stop()
    wait_gone(pid)


async def test_dispatcher_run_without_a_database_url_starts_embedded_postgres(
    base_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "DISPATCHER_CONFIG": os.devnull,
        "DISPATCHER_DATABASE_URL": "",
        "DISPATCHER_EMBEDDED_DATA_DIR": str(base_dir),
        "DISPATCHER_ADMIN_LISTEN": f"127.0.0.1:{port}",
        "DISPATCHER_LOG_FORMAT": "json",
    }
    env.pop("DISPATCHER_TEST_DATABASE_URL", None)
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "run"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as http:
            while True:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        server = EmbeddedPostgres(base_dir).server_pid()
        assert server is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        wait_gone(server)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert "embedded.started" in text
    assert "migration.applied" in text
