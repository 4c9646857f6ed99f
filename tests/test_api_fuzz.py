"""Property-based run: schemathesis generates requests from /openapi.json against the daemon.

No request may get a 5xx, and every answer must match the documented status codes,
content types and schemas. Runs as a process against a daemon process, as a user would.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import orjson
import pytest
import trustme

from dispatcher import tokens

from .helpers import DaemonProcess, Receiver, subscribe
from .test_egress import client_tls

ADMIN_TOKEN = "admin-token-for-the-fuzz-run-0123456789"
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
async def test_generated_requests_get_no_5xx_and_match_the_schema(
    database: str, db: asyncpg.Connection, receiver: Receiver, tmp_path: Path
) -> None:
    token = await tokens.create(db, "env-fuzz")
    await subscribe(db, receiver.url(), ["*"], environment="env-fuzz")
    # Taken now: the run may delete the subscription.
    secret = await db.fetchval("SELECT secret FROM dispatcher.subscriptions")
    # Deliveries to list, read and resend: the stateful phase follows the delivery list's
    # links (items/0/id) only when a page has items.
    for n in range(20):
        await db.execute(
            "SELECT dispatcher.publish('env-fuzz', $1, '{}')", f"products.create.v{n % 3}"
        )
    with DaemonProcess(database, {"DISPATCHER_ADMIN_TOKEN": ADMIN_TOKEN}) as daemon:
        daemon.start(tmp_path)
        await daemon.wait_ready()
        base = f"http://127.0.0.1:{daemon.port}"
        links = tmp_path / "links.log"
        for who in (token, ADMIN_TOKEN):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"{base}/openapi.json",
                "--header",
                f"Authorization: Bearer {who}",
                "--checks",
                "all",
                "--max-examples",
                "15",
                "--seed",
                "20261125",
                "--phases",
                "examples,coverage,fuzzing,stateful",
                # PostgreSQL text cannot hold NUL; the API refuses it (422, documented).
                "--generation-allow-x00",
                "false",
                "--request-timeout",
                "10",
                "--no-color",
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks",
                    "PYTHONPATH": str(ROOT),
                    "FUZZ_ENVIRONMENT": "env-fuzz",
                    "FUZZ_RECEIVER": receiver.url(),
                    "FUZZ_LINKS_LOG": str(links),
                    "FUZZ_TLS": orjson.dumps(client_tls(trustme.CA(), trustme.CA())).decode(),
                },
                cwd=tmp_path,
            )
            output, _ = await asyncio.wait_for(proc.communicate(), 240)
            text = output.decode(errors="replace")
            print(text[text.find("Examples (in") :])  # what ran, shown with -s or a failure
            assert proc.returncode == 0, (
                text[-20000:] + "\n-- daemon --\n" + daemon.output()[-3000:]
            )
        log = daemon.output()
        assert "Traceback" not in log, log[log.index("Traceback") - 300 :][:3000]
        # Tokens and signing secrets never reach the log.
        for sensitive in (token, ADMIN_TOKEN, secret):
            assert sensitive not in log
        # The stateful phase read or resent deliveries it found in a list page: the links
        # from the delivery list were followed, not only declared.
        followed = links.read_text() if links.exists() else ""
        assert followed, "no delivery from a list page was read or resent"
