"""CPU time of the bench's other processes, read from /proc (Linux): the receiver, and the
PostgreSQL server when it runs on this machine. With them the bench shows where each
delivery's CPU goes, not only the dispatcher's share."""

from __future__ import annotations

import os
from pathlib import Path

import asyncpg

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3 onwards)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def process_seconds(pid: int, *, reaped_children: bool = False) -> float | None:
    """User + system CPU seconds of a live process (and of the children it has waited for)."""
    fields = _stat(pid)
    if fields is None:
        return None
    # utime, stime, cutime, cstime are fields 14-17 of the stat line.
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICKS


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == parent:
                found.append(int(entry.name))
    return found


async def postmaster_of(conn: asyncpg.Connection) -> int | None:
    """The server's main process when it runs here (None for a server elsewhere)."""
    backend = await conn.fetchval("/*bench*/ SELECT pg_backend_pid()")
    return _postgres_parent(int(backend))


def _postgres_parent(backend: int) -> int | None:
    fields = _stat(backend)
    if fields is None:
        return None
    parent = int(fields[1])
    try:
        command = Path(f"/proc/{parent}/cmdline").read_bytes()
    except OSError:
        return None
    return parent if b"postgres" in command else None


def server_seconds(postmaster: int) -> float | None:
    """CPU seconds of the whole server: the postmaster, the backends and workers it has
    reaped, and those still running."""
    total = process_seconds(postmaster, reaped_children=True)
    if total is None:
        return None
    for child in _children(postmaster):
        total += process_seconds(child) or 0.0
    return total


def rss_of(pid: int) -> tuple[float, float]:
    """A process's resident memory now and at its peak (VmRSS, VmHWM), in MB (0 if gone)."""
    now = peak = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    return now, peak
