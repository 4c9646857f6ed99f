"""Large payloads: 100 events of 10 MB published in one SQL statement, sent by `dispatcher
run` in its own process with default settings (but max_payload_bytes, raised to take them):
the daemon's peak RSS, which [delivery] claim_bytes bounds whatever the payload.

Before claims were bounded by bytes, a claim took up to a batch of rows whatever their size
and held each as text, envelope and body: this run peaked at 1,425 MB.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .burn import DaemonProcess
from .cpu import rss_of
from .kit import TAG, Context, drain, forget, subscribe

MB = 1_000_000


@dataclass(frozen=True, slots=True)
class Large:
    events: int
    payload_mb: float
    claim_bytes: int
    seconds: float
    rss_peak_mb: float  # the daemon process's VmHWM: its peak resident set


async def large(ctx: Context, events: int = 100, payload_bytes: int = 10 * MB) -> Large:
    env = ["bench-large"]
    await subscribe(ctx, env[0], "/ok/large")
    daemon = DaemonProcess(ctx, {"max_payload_bytes": payload_bytes + 1024})
    async with daemon:
        ctx.progress.show(f"[large] publishing {events} events of {payload_bytes / MB:.0f} MB")
        await ctx.conn.execute(
            TAG + "INSERT INTO dispatcher.events (environment_id, event_name, payload) "
            "SELECT $1, 'products.update.v0', jsonb_build_object('blob', "
            "repeat(md5(g::text), $3 / 32) || g) FROM generate_series(1, $2) g",
            env[0],
            events,
            payload_bytes - 16,
        )
        begun = time.perf_counter()
        await drain(ctx, "large", env, events, 600.0)
        seconds = time.perf_counter() - begun
        _, peak = rss_of(daemon.pid)
        claim_bytes = daemon.settings.delivery.claim_bytes
    ctx.progress.done()
    await forget(ctx, env)
    return Large(
        events=events,
        payload_mb=round(payload_bytes / MB, 1),
        claim_bytes=claim_bytes,
        seconds=round(seconds, 1),
        rss_peak_mb=round(peak, 1),
    )
