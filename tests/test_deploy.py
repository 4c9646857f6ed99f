"""The deploy/ files are valid for the tools that read them and use only metrics we export.

systemd-analyze (Debian package `systemd`) and promtool (Debian package `prometheus`) must
be installed: a missing tool fails the test, naming the package, so CI never passes on a
check that did not run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher.metrics import Metrics

from .helpers import missing_system_package

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "dispatcher.service"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dispatcher-dashboard.json"
CONTAINERFILE = DEPLOY / "Containerfile"

INSTALLED_DISPATCHER = "/usr/local/bin/dispatcher"
TOOLS = {"systemd-analyze": "systemd", "promtool": "prometheus"}

# A PromQL identifier directly followed by a selector ({) or a range ([) is a metric name;
# followed by ( it is a function, followed by = or ~ a label.
_SELECTED = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]")
_OURS = re.compile(r"\bdispatcher_[a-zA-Z0-9_:]*")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing_system_package(
            f"{name} is not installed: apt-get install -y --no-install-recommends {TOOLS[name]}"
        )
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def exported_metric_names() -> set[str]:
    """Every series name a Metrics() registry exposes, with the suffixes the exposition adds."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
    }
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(family.name + s for s in suffixes[family.type])
    return names


def metric_names(expr: str) -> set[str]:
    return set(_SELECTED.findall(expr)) | set(_OURS.findall(expr))


def alert_exprs() -> list[str]:
    """The `expr:` of every rule in alerts.yml, one line or a `|` block (no YAML library here)."""
    exprs: list[str] = []
    lines = ALERTS.read_text().splitlines()
    for i, line in enumerate(lines):
        key, _, value = line.strip().partition(":")
        if key != "expr":
            continue
        if value.strip() != "|":
            exprs.append(value.strip())
            continue
        indent = len(line) - len(line.lstrip())
        block = []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        exprs.append(" ".join(block).strip())
    return exprs


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def dashboard_exprs() -> list[tuple[str, str]]:
    return [
        (p["title"], t["expr"])
        for p in panels(dashboard()["panels"])
        for t in p.get("targets", [])
        if "expr" in t
    ]


# -- systemd -------------------------------------------------------------------------------


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's dispatcher.

    `systemd-analyze verify` refuses a unit whose binary does not exist; the unit names the
    install path (/usr/local/bin), which a test machine need not have. Only that path changes.
    """
    venv_dispatcher = Path(sys.executable).parent / "dispatcher"
    assert venv_dispatcher.exists(), "install the project first: pip install -e '.[test]'"
    text = UNIT.read_text()
    exec_start = f"ExecStart={INSTALLED_DISPATCHER} "
    assert text.count(exec_start) == 1
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(exec_start, f"ExecStart={venv_dispatcher} "))
    return copy


def test_unit_runs_the_installed_daemon_with_the_system_config() -> None:
    lines = UNIT.read_text().splitlines()
    assert f"ExecStart={INSTALLED_DISPATCHER} run --config /etc/dispatcher/config.toml" in lines
    for setting in (
        "Type=notify",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "DynamicUser=yes",
        "StateDirectory=dispatcher",
        "Environment=DISPATCHER_EMBEDDED_DATA_DIR=%S/dispatcher",
        "EnvironmentFile=-/etc/dispatcher/env",
        "CapabilityBoundingSet=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
    ):
        assert setting in lines, setting


def test_unit_stop_timeout_exceeds_the_grace_period() -> None:
    from dispatcher.config import DeliverySettings

    match = re.search(r"^TimeoutStopSec=(\d+)s$", UNIT.read_text(), re.MULTILINE)
    assert match is not None
    assert int(match[1]) > DeliverySettings().grace_period + 10


def test_systemd_analyze_verify_accepts_the_unit(unit_copy: Path) -> None:
    result = run(tool("systemd-analyze"), "verify", str(unit_copy))
    # verify exits 0 on an unknown key or an unparsable value and only prints a warning,
    # so any output at all is a failure.
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_systemd_analyze_verify_would_catch_a_broken_unit(tmp_path: Path, unit_copy: Path) -> None:
    broken = tmp_path / "broken" / UNIT.name
    broken.parent.mkdir()
    broken.write_text(unit_copy.read_text().replace("ProtectSystem=strict", "ProtectSystem=strct"))
    result = run(tool("systemd-analyze"), "verify", str(broken))
    assert "strct" in result.stdout + result.stderr


def test_unit_exposure_stays_low(unit_copy: Path) -> None:
    # --threshold is in tenths: 20 is an exposure of 2.0 ("OK") on systemd's 0-10 scale.
    result = run(
        tool("systemd-analyze"), "security", "--offline=true", "--threshold=20", str(unit_copy)
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


# -- Prometheus ----------------------------------------------------------------------------


def test_promtool_accepts_the_scrape_config_and_its_rules() -> None:
    # check config also loads and checks the rule_files it names (alerts.yml).
    result = run(tool("promtool"), "check", "config", str(PROMETHEUS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    result = run(tool("promtool"), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_would_catch_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "alerts.yml"
    broken.write_text(ALERTS.read_text().replace("> 300", "> > 300", 1))
    result = run(tool("promtool"), "check", "rules", str(broken))
    assert result.returncode != 0


def test_alerts_use_only_exported_metrics() -> None:
    exported = exported_metric_names()
    exprs = alert_exprs()
    assert len(exprs) == ALERTS.read_text().count("- alert:")
    for expr in exprs:
        used = metric_names(expr) - {"up"}  # up is Prometheus's own, one per target
        assert used <= exported, f"not exported: {sorted(used - exported)} in {expr}"
        assert used or "up{" in expr, f"no metric in {expr}"


def test_alerts_cover_lag_failures_db_errors_and_down() -> None:
    text = ALERTS.read_text()
    for needle in (
        "dispatcher_oldest_due_age_seconds",
        "dispatcher_attempts_total",
        "dispatcher_deliveries_total",
        "dispatcher_db_errors_total",
        'up{job="dispatcher"} == 0',
    ):
        assert needle in text, needle


# -- Grafana -------------------------------------------------------------------------------


def test_dashboard_has_a_datasource_variable_and_a_recent_schema() -> None:
    dash = dashboard()
    assert dash["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in panels(dash["panels"]):
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]


def test_dashboard_panel_ids_are_unique() -> None:
    ids = [p["id"] for p in panels(dashboard()["panels"])]
    assert len(ids) == len(set(ids))


def test_every_dashboard_expression_uses_only_exported_metrics() -> None:
    exported = exported_metric_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for title, expr in exprs:
        used = metric_names(expr)
        assert used, f"{title}: no metric in {expr}"
        assert used <= exported, f"{title}: not exported: {sorted(used - exported)} in {expr}"


def test_dashboard_shows_every_exported_metric() -> None:
    used = set().union(*(metric_names(e) for _, e in dashboard_exprs()))
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    declared = {f.name for f in Metrics().registry.collect()}
    assert declared <= families, f"no panel for {sorted(declared - families)}"


def test_promtool_parses_every_dashboard_expression(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, checked as a recording rule."""
    grafana_vars = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*"}
    rules = []
    for i, (_, expr) in enumerate(dashboard_exprs()):
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    # JSON is YAML, so promtool reads this file as it is.
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(tool("promtool"), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- Container image -----------------------------------------------------------------------


def test_containerfile_copies_only_what_exists_and_runs_unprivileged() -> None:
    text = CONTAINERFILE.read_text()
    instructions = [
        line.split(None, 1)
        for line in text.replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    sources = [
        src
        for op, rest in instructions
        if op == "COPY" and not rest.startswith("--from")
        for src in rest.split()[:-1]
    ]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    ignore = (DEPLOY / "Containerfile.dockerignore").read_text().splitlines()
    for src in sources:
        assert f"!{src}" in ignore, f"{src} is excluded from the build context"
    ops = {op: rest for op, rest in instructions}
    assert ops["FROM"].startswith("python:3.11-slim")
    assert ops["USER"].split(":")[0] not in ("root", "0")
    assert ops["EXPOSE"] == "8080"
    assert "DISPATCHER_ADMIN_LISTEN=0.0.0.0:8080" in text
    assert "/healthz" in ops["HEALTHCHECK"]
    assert json.loads(ops["CMD"]) == ["dispatcher", "run"]
