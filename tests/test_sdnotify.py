"""Readiness notification reaches a real AF_UNIX datagram socket, as systemd's does."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher import sdnotify

from .helpers import DaemonProcess, http_status


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd's, and the $NOTIFY_SOCKET naming it."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2.0)
        yield sock, str(path)


def test_ready_sends_ready_and_status(notify_socket: tuple[socket.socket, str]) -> None:
    sock, name = notify_socket
    assert sdnotify.ready("admin on http://127.0.0.1:8080", {"NOTIFY_SOCKET": name})
    assert sock.recv(4096) == b"READY=1\nSTATUS=admin on http://127.0.0.1:8080"


def test_ready_without_status_sends_only_ready(notify_socket: tuple[socket.socket, str]) -> None:
    sock, name = notify_socket
    assert sdnotify.ready(environ={"NOTIFY_SOCKET": name})
    assert sock.recv(4096) == b"READY=1"


def test_status_cannot_inject_another_assignment(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, name = notify_socket
    assert sdnotify.ready("up\nMAINPID=1", {"NOTIFY_SOCKET": name})
    assert sock.recv(4096) == b"READY=1\nSTATUS=up MAINPID=1"


def test_stopping_sends_stopping(notify_socket: tuple[socket.socket, str]) -> None:
    sock, name = notify_socket
    assert sdnotify.stopping({"NOTIFY_SOCKET": name})
    assert sock.recv(4096) == b"STOPPING=1"


def test_reads_notify_socket_from_the_process_environment(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, name = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    assert sdnotify.notify("WATCHDOG=1")
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_abstract_socket_name_starting_with_at() -> None:
    name = f"dispatcher-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2.0)
        assert sdnotify.ready("ok", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1\nSTATUS=ok"


def test_unset_or_empty_socket_is_a_quiet_no(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.ready("x")
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": ""})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "relative/path"})


def test_a_socket_nobody_listens_on_returns_false(tmp_path: Path) -> None:
    assert not sdnotify.stopping({"NOTIFY_SOCKET": str(tmp_path / "gone")})


async def test_the_daemon_says_ready_once_serving_and_stopping_on_sigterm(
    database: str, tmp_path: Path
) -> None:
    """What a Type=notify unit sees from `dispatcher run`."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        with DaemonProcess(database, {"NOTIFY_SOCKET": str(path)}) as daemon:
            daemon.start(tmp_path)
            ready = await asyncio.wait_for(loop.sock_recv(sock, 4096), 30)
            assert ready.startswith(b"READY=1\nSTATUS=admin on http://127.0.0.1:")
            # Ready means serving: the admin port answers at once.
            assert await http_status(f"http://127.0.0.1:{daemon.port}/healthz") == 200
            daemon.signal(signal.SIGTERM)
            assert await asyncio.wait_for(loop.sock_recv(sock, 4096), 10) == b"STOPPING=1"
            assert await daemon.wait_exit(timeout=15) == 0
