"""Burn-down: a backlog published at once, drained by the daemon, timed from the publish's
commit to the receiver's last answer.

The daemon runs in this process (`inprocess`, with its concurrency set to the bench's) or as
a separate `dispatcher run` with a config of defaults (`process`): the way a user runs it,
its CPU read from /proc, its claim and record times scraped from its /metrics.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .. import config
from ..app import started
from .cpu import rss_of
from .kit import (
    BURN_PAYLOAD_TEXT,
    Context,
    Meter,
    daemon_settings,
    drain,
    first_attempt_lags,
    forget,
    ms,
    per,
    percentiles,
    publish_calls,
    ramp,
    receiver_reset,
    rss_mb,
    subscribe,
    wait_answered,
)

DAEMON_MODES = ("inprocess", "process")


@dataclass(frozen=True, slots=True)
class Burn:
    """A backlog published in one transaction, burnt down by the daemon."""

    deliveries: int
    publish_seconds: float
    per_s: float  # deliveries / (the receiver's last answer - the publish's commit)
    ratio_to_ceiling: float | None
    lag_p50_ms: float | None
    lag_p99_ms: float | None
    statements_per_delivery: float | None
    wal_bytes_per_delivery: float
    cpu_seconds_per_delivery: float  # the daemon's
    postgres_cpu_us_per_delivery: float | None
    receiver_cpu_us_per_delivery: float | None
    peak_rss_mb: float
    rss_idle_mb: float  # the daemon started, before the backlog
    rss_after_mb: float  # the backlog burnt down, the daemon still running
    tables_before_kb: dict[str, int]
    tables_after_kb: dict[str, int]
    claim_mean_ms: float | None
    record_mean_ms: float | None
    mean_in_flight: float
    # Added with the raw receiver and the process mode (older keys above keep their names).
    daemon: str = "inprocess"
    payload_bytes: int = 0
    commit_to_last_s: float = 0.0
    drain_seconds: float = 0.0  # commit to every outcome recorded (the queue empty)
    first_delivery_ms: float | None = None  # commit to the receiver's first request
    ramp_s: float | None = None  # commit to a rate within 10% of the peak (500 ms windows)
    peak_per_s: float | None = None
    rate_series_per_s: list[float] = field(default_factory=list)  # per 100 ms from the commit
    daemon_cpu_us_per_delivery: float | None = None
    # PostgreSQL's CPU and the WAL split at the publish's commit: the publish and fan-out
    # (one statement, before the daemon sends anything) and the burn-down after it.
    postgres_publish_cpu_us_per_delivery: float | None = None
    postgres_burn_cpu_us_per_delivery: float | None = None
    wal_publish_bytes_per_delivery: float | None = None
    wal_burn_bytes_per_delivery: float | None = None
    bench_cpu_us_per_delivery: float | None = None  # process mode: the bench's own polling
    total_cpu_us_per_delivery: float | None = None  # daemon + PostgreSQL + receiver
    daemon_settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Run:
    """What one burn-down measured, before it becomes a Burn."""

    commit: float
    publish_seconds: float
    drained_at: float
    rss_idle_mb: float
    rss_after_mb: float
    peak_rss_mb: float | None
    claim_s: float | None
    record_s: float | None
    attempt_seconds: float


async def burn(ctx: Context, count: int, daemon: str = "inprocess") -> Burn:
    if daemon not in DAEMON_MODES:
        raise ValueError(f"daemon: choose from {DAEMON_MODES}")
    env = ["bench-burn"]
    timeout = max(60.0, count / 200)
    async with AsyncExitStack() as stack:
        if daemon == "process":
            proc = await stack.enter_async_context(DaemonProcess(ctx))
            pid: int | None = proc.pid
            settings = proc.settings
        else:
            settings = daemon_settings(ctx, in_flight=ctx.concurrency, per_endpoint=ctx.concurrency)
            running = await stack.enter_async_context(started(settings))
            pid = None
        await subscribe(ctx, env[0], "/ok/burn")
        await receiver_reset(ctx)
        meter = Meter(ctx, daemon_pid=pid)
        await meter.start()
        if daemon == "process":
            idle = await proc.scrape()
            rss_idle = rss_of(proc.pid)[0]
        else:
            busy0 = running.metrics.attempt_seconds_total()
            rss_idle = rss_mb()
        t0 = time.monotonic()
        commit = await publish_calls(ctx, env[0], count, BURN_PAYLOAD_TEXT)
        publish_s = commit - t0
        await meter.mark()
        answered = await wait_answered(ctx, "burn", count, timeout)
        await drain(ctx, "burn", env, count, timeout=timeout)
        drained_at = time.monotonic()
        costs = await meter.stop()
        if daemon == "process":
            rss_after, peak = rss_of(proc.pid)
            seen = await proc.scrape()
            run = _Run(
                commit,
                publish_s,
                drained_at,
                rss_idle,
                rss_after,
                peak,
                _mean(seen, "claim"),
                _mean(seen, "record"),
                seen.get("attempt_sum", 0.0) - idle.get("attempt_sum", 0.0),
            )
        else:
            run = _Run(
                commit,
                publish_s,
                drained_at,
                rss_idle,
                rss_mb(),
                None,
                running.metrics.mean_db_seconds("claim"),
                running.metrics.mean_db_seconds("record"),
                running.metrics.attempt_seconds_total() - busy0,
            )
    ctx.progress.done()
    p50, p99 = percentiles(await first_attempt_lags(ctx, env), 0.5, 0.99)
    await forget(ctx, env)
    assert answered.last_at is not None
    took = max(answered.last_at - run.commit, 1e-9)
    rose = ramp(answered, run.commit)
    daemon_us = per(costs.cpu_seconds, count)
    parts = (costs.cpu_seconds, costs.postgres_cpu_seconds, costs.receiver_cpu_seconds)
    return Burn(
        deliveries=count,
        publish_seconds=round(run.publish_seconds, 3),
        per_s=round(count / took, 1),
        ratio_to_ceiling=None,  # set against the ceiling measured around it
        lag_p50_ms=ms(p50),
        lag_p99_ms=ms(p99),
        statements_per_delivery=(
            None if costs.statements is None else round(costs.statements / count, 4)
        ),
        wal_bytes_per_delivery=round(costs.wal_bytes / count, 1),
        cpu_seconds_per_delivery=round(costs.cpu_seconds / count, 6),
        postgres_cpu_us_per_delivery=per(costs.postgres_cpu_seconds, count),
        receiver_cpu_us_per_delivery=per(costs.receiver_cpu_seconds, count),
        peak_rss_mb=round(run.peak_rss_mb or costs.peak_rss_mb, 1),
        rss_idle_mb=round(run.rss_idle_mb, 1),
        rss_after_mb=round(run.rss_after_mb, 1),
        tables_before_kb=costs.tables_before_kb,
        tables_after_kb=costs.tables_after_kb,
        claim_mean_ms=ms(run.claim_s),
        record_mean_ms=ms(run.record_s),
        mean_in_flight=round(run.attempt_seconds / took, 2),
        daemon=daemon,
        payload_bytes=len(BURN_PAYLOAD_TEXT),
        commit_to_last_s=round(took, 3),
        drain_seconds=round(run.drained_at - run.commit, 3),
        first_delivery_ms=ms(rose.first_delivery_s),
        ramp_s=rose.ramp_s,
        peak_per_s=rose.peak_per_s,
        rate_series_per_s=rose.series_per_s,
        daemon_cpu_us_per_delivery=daemon_us,
        postgres_publish_cpu_us_per_delivery=per(costs.postgres_cpu_seconds_before_mark, count),
        postgres_burn_cpu_us_per_delivery=(
            None
            if costs.postgres_cpu_seconds is None or costs.postgres_cpu_seconds_before_mark is None
            else per(costs.postgres_cpu_seconds - costs.postgres_cpu_seconds_before_mark, count)
        ),
        wal_publish_bytes_per_delivery=(
            None
            if costs.wal_bytes_before_mark is None
            else round(costs.wal_bytes_before_mark / count, 1)
        ),
        wal_burn_bytes_per_delivery=(
            None
            if costs.wal_bytes_before_mark is None
            else round((costs.wal_bytes - costs.wal_bytes_before_mark) / count, 1)
        ),
        bench_cpu_us_per_delivery=per(costs.bench_cpu_seconds, count),
        total_cpu_us_per_delivery=(
            None if any(p is None for p in parts) else per(sum(p or 0.0 for p in parts), count)
        ),
        daemon_settings={
            "max_in_flight": settings.delivery.max_in_flight,
            "max_per_endpoint": settings.delivery.max_per_endpoint,
            "claim_batch": settings.delivery.claim_batch,
            "flush_interval": settings.delivery.flush_interval,
        },
    )


def _mean(scraped: dict[str, float], operation: str) -> float | None:
    count = scraped.get(f"{operation}_count", 0.0)
    return scraped.get(f"{operation}_sum", 0.0) / count if count else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class DaemonProcess:
    """`python -m dispatcher run` with a config file of defaults but for what the bench must
    set: the database, the admin port, and loopback + plain http (the receiver is
    http://127.0.0.1). No DISPATCHER_* variable of ours reaches it."""

    def __init__(self, ctx: Context, delivery: dict[str, int] | None = None) -> None:
        self._ctx = ctx
        # [delivery] keys a scenario must set (the large-payload one: max_payload_bytes).
        self._delivery = delivery or {}
        self._tmp = tempfile.TemporaryDirectory(prefix="dispatcher-bench-daemon-")
        self._port = _free_port()
        self._proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None
        self.settings = config.Settings()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def __aenter__(self) -> DaemonProcess:
        base = Path(self._tmp.name)
        cfg = base / "config.toml"
        url = self._ctx.settings.database.url
        cfg.write_text(
            "# written by dispatcher bench: defaults, but for what the bench must set\n"
            f"[database]\nurl = {_toml(url)}\n"
            f'[admin]\nlisten = "127.0.0.1:{self._port}"\n'
            "[security]\nallow_loopback = true\nallow_http = true\n"
            + "".join(
                (["[delivery]\n"] if self._delivery else [])
                + [f"{key} = {value}\n" for key, value in self._delivery.items()]
            )
        )
        self.settings = config.load(cfg)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
        self._log = (base / "daemon.log").open("wb")
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dispatcher",
            "--config",
            str(cfg),
            "run",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=env,
        )
        try:
            await self._ready(timeout=60.0)
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self._proc is not None
                if self._proc.returncode is not None:
                    break
                try:
                    async with session.get(f"http://127.0.0.1:{self._port}/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        if self._log is not None:
            self._log.flush()
        tail = (Path(self._tmp.name) / "daemon.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"`dispatcher run` did not become ready:\n{tail}")

    async def scrape(self) -> dict[str, float]:
        """The hot path's statement and attempt duration sums and counts, from /metrics."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self._port}/metrics") as r,
        ):
            text = await r.text()
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "dispatcher_attempt_duration_seconds_sum":
                    found["attempt_sum"] = sample.value
                elif sample.name.startswith("dispatcher_db_duration_seconds_"):
                    op = sample.labels.get("operation", "")
                    found[f"{op}_{sample.name.rsplit('_', 1)[1]}"] = sample.value
        return found

    async def _stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._log is not None:
            self._log.close()
        self._tmp.cleanup()


def _toml(text: str) -> str:
    """A TOML basic string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
