"""Checks on the operations files: Prometheus config and alert rules, the Grafana dashboard, and
the systemd units.

Tools: ``promtool`` (Debian package ``prometheus``) and ``systemd-analyze`` (package ``systemd``,
version 250 or newer for ``verify --root``). When a tool is missing, the test skips, or fails
under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "etc" / "prometheus"
DASHBOARD = ROOT / "etc" / "grafana" / "nowconnect.json"
SYSTEMD_DIR = ROOT / "etc" / "systemd"
UNITS = ("nowconnect-hub.service", "nowconnect-agent.service")

# The metrics contract: the only names that alerts and dashboards may rely on.
METRICS = frozenset(
    {
        "nowconnect_tcp_connections_total",
        "nowconnect_tcp_bytes_total",
        "nowconnect_tcp_active_connections",
        "nowconnect_tcp_close_events_total",
        "nowconnect_tcp_open_failures_total",
        "nowconnect_agents_connected",
        "nowconnect_tunnel_connects_total",
        "nowconnect_tunnel_disconnects_total",
        "nowconnect_tcp_open_seconds",
        "nowconnect_agent_rejections_total",
        "nowconnect_limit_hits_total",
    }
)
HISTOGRAMS = frozenset({"nowconnect_tcp_open_seconds"})
SERIES_NAMES = (METRICS - HISTOGRAMS) | {
    f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")
}
METRIC_RE = re.compile(r"nowconnect_[a-z_]+")

ALERTS = frozenset(
    {
        "NowConnectNoTraffic",
        "NowConnectOneWayTraffic",
        "NowConnectAgentDisconnected",
        "NowConnectHighResetRate",
        "NowConnectOpenFailures",
        "NowConnectHubDown",
    }
)

APT_PACKAGE = {"promtool": "prometheus", "systemd-analyze": "systemd"}


def _missing(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        _missing(
            f"{tool} not found; install it with: apt-get install -y --no-install-recommends "
            f"{APT_PACKAGE[tool]}"
        )
    assert path is not None
    return path


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=60, env={**os.environ, "LC_ALL": "C"}
    )


def _load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


# --- Prometheus -------------------------------------------------------------------------------


def test_prometheus_config_valid(tmp_path: Path) -> None:
    """``promtool check config`` accepts prometheus.yml and finds the rules file beside it, and the
    config scrapes job ``nowconnect`` at nowconnect-cloud:8765/metrics."""
    promtool = _require("promtool")
    for name in ("prometheus.yml", "nowconnect.rules.yml"):
        shutil.copy(PROM_DIR / name, tmp_path / name)
    result = _run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr

    config = _load_yaml(PROM_DIR / "prometheus.yml")
    assert config["rule_files"] == ["nowconnect.rules.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "nowconnect"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["nowconnect-cloud:8765"]}]


def test_prometheus_rules_valid() -> None:
    """``promtool check rules`` accepts the alert rules file."""
    promtool = _require("promtool")
    result = _run([promtool, "check", "rules", "nowconnect.rules.yml"], cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_rules_unit_tests_pass() -> None:
    """``promtool test rules`` passes every case in nowconnect.rules.test.yml."""
    promtool = _require("promtool")
    result = _run([promtool, "test", "rules", "nowconnect.rules.test.yml"], cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_rules_define_the_alerts_with_labels_and_annotations() -> None:
    """Group ``nowconnect`` defines exactly the expected alerts. Each alert has a severity, a
    summary, a description and a runbook annotation, and uses only contract metric names."""
    rules = _load_yaml(PROM_DIR / "nowconnect.rules.yml")
    (group,) = [g for g in rules["groups"] if g["name"] == "nowconnect"]
    by_name = {r["alert"]: r for r in group["rules"]}
    assert set(by_name) == ALERTS
    for name, rule in by_name.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        assert set(METRIC_RE.findall(rule["expr"])) <= SERIES_NAMES, name
    assert "nowconnect_agents_connected" in by_name["NowConnectAgentDisconnected"]["expr"]
    assert 'up{job="nowconnect"} == 0' in by_name["NowConnectHubDown"]["expr"]


def test_rule_tests_cover_firing_and_silent_case_for_each_alert() -> None:
    """For every alert, the promtool test file expects it to fire in some case and to stay
    silent in another."""
    tests = _load_yaml(PROM_DIR / "nowconnect.rules.test.yml")
    fires: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert fires == ALERTS
    assert silent == ALERTS


# --- Grafana ----------------------------------------------------------------------------------


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def test_dashboard_uses_only_contract_metrics() -> None:
    """The dashboard is valid JSON. Every panel target queries through ``${DS_PROMETHEUS}`` and
    uses only contract metric names (histograms through ``_bucket``). Every contract metric
    appears in some panel."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert 36 <= dashboard["schemaVersion"] <= 41
    used: set[str] = set()
    ids = []
    for panel in _panels(dashboard["panels"]):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            names = set(METRIC_RE.findall(target["expr"]))
            assert names <= SERIES_NAMES, (panel["title"], names - SERIES_NAMES)
            used |= names
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    covered = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert covered >= METRICS, METRICS - covered


def test_dashboard_template_variables() -> None:
    """The dashboard declares the ``DS_PROMETHEUS`` data source variable and a ``connector``
    variable from ``label_values(nowconnect_tcp_connections_total, connector)``."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    connector = variables["connector"]
    assert connector["type"] == "query"
    assert connector["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert connector["definition"] == "label_values(nowconnect_tcp_connections_total, connector)"
    assert connector["query"]["query"] == connector["definition"]


# --- systemd ----------------------------------------------------------------------------------


def _directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for each assignment in a unit file, in order."""
    out = []
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


COMMON = [
    ("Unit", "After", "network-online.target"),
    ("Unit", "Wants", "network-online.target"),
    ("Service", "Type", "simple"),
    ("Service", "Restart", "always"),
    ("Service", "RestartSec", "2"),
    ("Service", "User", "nowconnect"),
    ("Service", "Group", "nowconnect"),
    ("Service", "KillSignal", "SIGTERM"),
    ("Service", "TimeoutStopSec", "30"),
    ("Service", "Environment", "PYTHONUNBUFFERED=1"),
    ("Service", "NoNewPrivileges", "yes"),
    ("Service", "ProtectSystem", "strict"),
    ("Service", "ProtectHome", "yes"),
    ("Service", "PrivateTmp", "yes"),
    ("Service", "PrivateDevices", "yes"),
    ("Service", "ProtectKernelTunables", "yes"),
    ("Service", "ProtectKernelModules", "yes"),
    ("Service", "ProtectKernelLogs", "yes"),
    ("Service", "ProtectControlGroups", "yes"),
    ("Service", "RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ("Service", "RestrictNamespaces", "yes"),
    ("Service", "LockPersonality", "yes"),
    ("Service", "MemoryDenyWriteExecute", "yes"),
    ("Service", "SystemCallArchitectures", "native"),
    ("Service", "ReadOnlyPaths", "/etc/nowconnect"),
    ("Install", "WantedBy", "multi-user.target"),
]
TWISTD = "/opt/nowconnect/venv/bin/twistd --nodaemon --pidfile= --logger nowconnect.logs.observer"


def test_hub_unit_directives() -> None:
    """The hub unit runs twistd in the foreground with hub.yaml, as the nowconnect user, holding
    only CAP_NET_BIND_SERVICE, with the required restart, stop and hardening settings."""
    directives = _directives(SYSTEMD_DIR / "nowconnect-hub.service")
    for expected in COMMON + [
        ("Service", "ExecStart", f"{TWISTD} nowconnect-hub --config /etc/nowconnect/hub.yaml"),
        ("Service", "AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("Service", "CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
    ]:
        assert expected in directives, expected
    assert [k for _, k, _ in directives].count("ExecStart") == 1


def test_agent_unit_directives() -> None:
    """The agent unit runs twistd in the foreground with agent.yaml. It loads the optional
    agent.env, holds no capabilities, and has the same restart, stop and hardening settings."""
    directives = _directives(SYSTEMD_DIR / "nowconnect-agent.service")
    for expected in COMMON + [
        ("Service", "ExecStart", f"{TWISTD} nowconnect-agent --config /etc/nowconnect/agent.yaml"),
        ("Service", "EnvironmentFile", "-/etc/nowconnect/agent.env"),
    ]:
        assert expected in directives, expected
    keys = {k: v for _, k, v in directives}
    assert "AmbientCapabilities" not in keys
    assert keys.get("CapabilityBoundingSet", "") == ""
    assert [k for _, k, _ in directives].count("ExecStart") == 1


@pytest.fixture(scope="module")
def systemd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root directory for ``systemd-analyze verify --root``. It holds a copy of the host's
    unit directory (for sysinit.target, network-online.target, ...) and an executable stub at
    the ExecStart path, so each unit is verified unmodified."""
    analyze = _require("systemd-analyze")
    version = _run([analyze, "--version"], cwd=ROOT).stdout.split()
    if len(version) < 2 or not version[1].isdigit() or int(version[1]) < 250:
        _missing(f"systemd-analyze verify --root needs systemd >= 250, found {version[:2]}")
    host_units = next(
        (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
        None,
    )
    if host_units is None:
        _missing("no systemd unit directory; apt-get install -y --no-install-recommends systemd")
    assert host_units is not None
    root = tmp_path_factory.mktemp("systemd-root")
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    twistd = root / "opt/nowconnect/venv/bin/twistd"
    twistd.parent.mkdir(parents=True)
    twistd.write_text("#!/bin/sh\nexit 0\n")
    twistd.chmod(0o755)
    return root


def _verify(root: Path, name: str, text: str) -> tuple[int, list[str]]:
    """Install the unit as NAME under ROOT and verify it. Returns the exit code and the
    diagnostic lines that mention the unit. systemd-analyze exits 0 even for unparsable
    values and unknown keys; it only logs ``<path>:<line>: ...``."""
    (root / "etc/systemd/system" / name).write_text(text, encoding="utf-8")
    result = _run(
        [
            shutil.which("systemd-analyze") or "systemd-analyze",
            "verify",
            f"--root={root}",
            "--man=no",
            "--recursive-errors=no",
            name,
        ],
        cwd=root,
    )
    lines = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in lines if name in line]


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify(systemd_root: Path, unit: str) -> None:
    """``systemd-analyze verify`` accepts the unit as shipped: exit code 0 and no diagnostic
    naming the unit file (unknown keys and bad values are only logged, never fatal)."""
    code, complaints = _verify(systemd_root, unit, (SYSTEMD_DIR / unit).read_text("utf-8"))
    assert code == 0, complaints
    assert complaints == []


@pytest.mark.parametrize(
    ("directive", "broken"),
    [("RestartSec=2", "RestartSec=two"), ("LockPersonality=yes", "LockPersonalty=yes")],
)
def test_systemd_analyze_verify_reports_mistakes(
    systemd_root: Path, directive: str, broken: str
) -> None:
    """Control for the test above. On this host's systemd, a bad value or a misspelt key in a
    copy of the hub unit yields a diagnostic naming the file and line, so an empty list above
    means something."""
    text = (SYSTEMD_DIR / "nowconnect-hub.service").read_text("utf-8")
    assert directive in text
    name = "nowconnect-broken.service"
    lineno = text.splitlines().index(directive) + 1
    _, complaints = _verify(systemd_root, name, text.replace(directive, broken))
    assert any(f"{name}:{lineno}:" in line for line in complaints), complaints
