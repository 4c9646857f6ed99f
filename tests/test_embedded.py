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

from dispatcher import embedded
from dispatcher.embedded import EmbeddedPostgres, anchor_of, default_data_dir

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


def test_the_default_data_dir_is_the_units_state_directory_or_one_per_project(
    tmp_path: Path,
) -> None:
    state = {"STATE_DIRECTORY": "/var/lib/dispatcher-unit:/var/lib/other"}
    assert default_data_dir(tmp_path, state) == Path("/var/lib/dispatcher-unit")
    one, two = tmp_path / "shop-a", tmp_path / "shop-b"
    env = {"XDG_DATA_HOME": str(tmp_path / "xdg")}
    assert default_data_dir(one, env) == default_data_dir(one, env)
    assert default_data_dir(one, env) != default_data_dir(two, env)
    assert default_data_dir(one, env).name.startswith("shop-a-")
    parent = Path("/var/lib/dispatcher") if os.geteuid() == 0 else tmp_path / "xdg" / "dispatcher"
    assert default_data_dir(one, env).parent == parent
    config = one / "config.toml"
    one.mkdir()
    config.write_text("")
    assert anchor_of(config) == one.resolve()
    assert anchor_of(Path(os.devnull)) == Path.cwd()
    assert anchor_of(None) == Path.cwd()


def _cli(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DISPATCHER_") and k != "STATE_DIRECTORY"
    }
    env["DISPATCHER_LOG_FORMAT"] = "json"
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_two_projects_never_share_an_embedded_database() -> None:
    projects = [Path(tempfile.mkdtemp(prefix="disp-proj-")) for _ in range(2)]
    environ = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
    data_dirs = [default_data_dir(p, environ) for p in projects]
    try:
        for project, environment in zip(projects, ("shop-1", "shop-2"), strict=True):
            made = _cli(project, "token", "create", "--environment", environment)
            assert made.returncode == 0, made.stderr
            assert made.stdout.startswith("dsp_")
        for project, data_dir, environment in zip(
            projects, data_dirs, ("shop-1", "shop-2"), strict=True
        ):
            url = _cli(project, "db-url")
            assert url.stdout.strip() == f"postgresql://postgres@/dispatcher?host={data_dir}/run"
            assert "not running" in url.stderr
            seen = _cli(
                project, "psql", "-At", "-c", "SELECT environment_id FROM dispatcher.tokens"
            )
            assert seen.returncode == 0, seen.stderr
            assert seen.stdout.split() == [environment]
            # The one line that says which database a command or the daemon uses.
            assert f'"data_dir": "{data_dir}"' in seen.stderr
            assert '"event": "database.embedded"' in seen.stderr
            assert embedded.running_pid(data_dir) is None, "psql's server stops after it"
    finally:
        for path in (*projects, *data_dirs):
            pid = embedded.running_pid(path)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(path, ignore_errors=True)
