"""
C{scripts/health-gate} against a running deployment (hub and agent as real C{twistd} processes,
slapd as the target), and the commands of C{docs/operations.md} run as written.

The gate is run as a subprocess with this interpreter (it needs ldap3, which the test extra
installs), exactly as CI or an operator would run it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import Deployment, free_port, running
from slapd import ADMIN_DN, ADMIN_PASSWORD, BASE_DN, Slapd, require_slapd

ROOT = Path(__file__).resolve().parent.parent
GATE = ROOT / "scripts" / "health-gate"
DOC = ROOT / "docs" / "operations.md"
BIN = Path(sys.executable).parent

DELTA_LINE = re.compile(
    r"^(nowconnect_tcp_(?:connections|bytes)_total)\{(.*)\} (\d+) -> (\d+) \(delta \+(\d+)\)$",
    re.M)


@pytest.fixture(scope="module")
def deployment(slapd: Slapd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Hub + agent with connector C{addomain} -> the shared slapd."""
    with running(tmp_path_factory.mktemp("health-gate"),
                   {"addomain": (slapd.host, slapd.port)}) as d:
        yield d


def gate(*args: str, python: tuple[str, ...] = (sys.executable,)
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*python, str(GATE), *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def args_for(d: Deployment, listener: str | None = None, connector: str = "addomain"
             ) -> list[str]:
    return ["--hub", f"http://127.0.0.1:{d.web_port}",
            "--listener", listener or f"127.0.0.1:{d.listener_port['addomain']}",
            "--connector", connector, "--base", BASE_DN]


def printed_deltas(stdout: str) -> dict[str, tuple[int, int, int]]:
    """'name{labels}' -> (before, after, delta) from the gate's delta lines."""
    return {f"{m[1]}{{{m[2]}}}": (int(m[3]), int(m[4]), int(m[5]))
            for m in DELTA_LINE.finditer(stdout)}


# -- the gate -------------------------------------------------------------------------------------

def test_gate_passes_and_prints_exact_deltas(deployment: Deployment) -> None:
    """Against a healthy deployment the gate exits 0, prints PASS and one line per counter
    with before -> after (delta); the printed values are the hub's own (read independently
    before and after), and its one LDAP session is exactly one new connection."""
    m = deployment.metric
    before = {"c": m("nowconnect_tcp_connections_total", connector="addomain"),
              "c2a": m("nowconnect_tcp_bytes_total", connector="addomain", direction="c2a"),
              "a2c": m("nowconnect_tcp_bytes_total", connector="addomain", direction="a2c")}
    res = gate(*args_for(deployment))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.rstrip().endswith("health-gate: PASS")
    assert "/healthz: {\"status\": \"ok\"}" in res.stdout
    assert f"anonymous bind + base search of {BASE_DN}" in res.stdout
    after = {"c": m("nowconnect_tcp_connections_total", connector="addomain"),
             "c2a": m("nowconnect_tcp_bytes_total", connector="addomain", direction="c2a"),
             "a2c": m("nowconnect_tcp_bytes_total", connector="addomain", direction="a2c")}
    shown = printed_deltas(res.stdout)
    assert shown == {
        'nowconnect_tcp_connections_total{connector="addomain"}':
            (before["c"], after["c"], after["c"] - before["c"]),
        'nowconnect_tcp_bytes_total{connector="addomain",direction="c2a"}':
            (before["c2a"], after["c2a"], after["c2a"] - before["c2a"]),
        'nowconnect_tcp_bytes_total{connector="addomain",direction="a2c"}':
            (before["a2c"], after["a2c"], after["a2c"] - before["a2c"]),
    }
    assert after["c"] - before["c"] == 1
    assert after["c2a"] > before["c2a"] and after["a2c"] > before["a2c"]


def test_gate_with_bind_dn(deployment: Deployment, tmp_path: Path) -> None:
    """With --bind-dn and --password-file the gate binds as that DN and passes; a wrong
    password fails with exit 4 and slapd's invalidCredentials (49), which also shows the
    tunnel carried the bind."""
    pw = tmp_path / "pw"
    pw.write_text(ADMIN_PASSWORD + "\n")
    res = gate(*args_for(deployment), "--bind-dn", ADMIN_DN, "--password-file", str(pw))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{ADMIN_DN} bind + base search" in res.stdout

    res = gate(*args_for(deployment), "--bind-dn", ADMIN_DN, "--password", "wrong")
    assert res.returncode == 4, res.stdout + res.stderr
    assert "health-gate: FAIL: LDAP bind as cn=admin" in res.stderr
    assert "49 invalidCredentials" in res.stderr


def test_gate_fails_without_agent(deployment: Deployment) -> None:
    """After stop_agent() the gate fails with exit 4: the LDAP connection is closed by the hub,
    and the reason names the hub's count (open_failures reason no_agent) and the log event to
    grep (no_agent_for_connector), which the hub did log.  The agent is restarted after."""
    no_agent_before = len(deployment.hub_events("no_agent_for_connector"))
    deployment.stop_agent()
    try:
        deployment.wait_for(
            lambda: deployment.metric("nowconnect_agents_connected", connector="addomain") == 0,
            10, "the hub noticing the agent left")
        res = gate(*args_for(deployment))
        assert res.returncode == 4, res.stdout + res.stderr
        assert "PASS" not in res.stdout
        assert "health-gate: FAIL: LDAP session via" in res.stderr
        assert 'nowconnect_tcp_open_failures_total{reason="no_agent"} +1' in res.stderr
        assert "no_agent_for_connector" in res.stderr
        assert len(deployment.hub_events("no_agent_for_connector")) == no_agent_before + 1
    finally:
        deployment.start_agent()
    assert gate(*args_for(deployment)).returncode == 0


def test_gate_fails_when_bypassing_the_tunnel(deployment: Deployment, slapd: Slapd) -> None:
    """--listener pointed at slapd itself: the LDAP search works but the hub's counters do
    not move, so the gate fails (exit 1) and says which counters stood still."""
    res = gate(*args_for(deployment, listener=f"{slapd.host}:{slapd.port}"))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "health-gate: LDAP ok" in res.stdout
    shown = printed_deltas(res.stdout)
    assert len(shown) == 3 and all(d == 0 for _, _, d in shown.values())
    assert "health-gate: FAIL: counters did not increase: nowconnect_tcp_connections_total" \
        in res.stderr


def test_gate_unknown_connector(deployment: Deployment) -> None:
    """A connector the hub has no series for fails with exit 1, listing the known ones."""
    res = gate(*args_for(deployment, connector="nosuch"))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "no nowconnect_tcp_connections_total series for connector 'nosuch'" in res.stderr
    assert "connectors with series: addomain" in res.stderr


def test_gate_hub_unreachable() -> None:
    """Nothing listening at --hub: exit 3, 'hub unreachable', connection refused."""
    port = free_port()
    res = gate("--hub", f"http://127.0.0.1:{port}", "--listener", "127.0.0.1:389",
               "--connector", "addomain", "--base", BASE_DN)
    assert res.returncode == 3, res.stdout + res.stderr
    assert f"health-gate: FAIL: hub unreachable: GET http://127.0.0.1:{port}/healthz" in res.stderr
    assert "refused" in res.stderr.lower()


def test_gate_metrics_forbidden_and_cidr_blocked(slapd: Slapd, tmp_path: Path) -> None:
    """metrics_allow_cidrs without our address: /metrics answers 403 and the gate exits 3
    naming it.  A listener whose allow_cidrs exclude us: the LDAP session is cut and the gate
    exits 4, quoting the hub's cidr_blocked count."""
    with Deployment(tmp_path / "metrics", {"addomain": (slapd.host, slapd.port)},
                    hub_extra={"metrics_allow_cidrs": ["10.0.0.0/8"]}) as d:
        d.start_hub()
        res = gate(*args_for(d))
        assert res.returncode == 3, res.stdout + res.stderr
        assert "/metrics: 403 forbidden" in res.stderr
        assert "metrics_allow_cidrs" in res.stderr
    with Deployment(tmp_path / "cidr", {"addomain": (slapd.host, slapd.port)},
                    allow_cidrs=["10.0.0.0/8"]) as d:
        d.start_hub()
        d.start_agent()
        res = gate(*args_for(d))
        assert res.returncode == 4, res.stdout + res.stderr
        assert 'open_failures_total{reason="cidr_blocked"} +1' in res.stderr
        assert d.hub_events("cidr_blocked")


def test_gate_without_ldap3(deployment: Deployment) -> None:
    """Run by a Python without ldap3 (-S: no site-packages) the gate exits 5 and says what
    to install, instead of a traceback."""
    res = gate(*args_for(deployment), python=(sys.executable, "-S"))
    assert res.returncode == 5, res.stdout + res.stderr
    assert "ldap3 is not installed" in res.stderr
    assert "Traceback" not in res.stderr


def test_gate_help_and_usage() -> None:
    """The script is executable with a python3 shebang; --help documents every option and
    the exit statuses; a bad --listener is a usage error (exit 2)."""
    assert os.access(GATE, os.X_OK)
    assert GATE.read_text().startswith("#!/usr/bin/env python3\n")
    res = gate("--help")
    assert res.returncode == 0
    for word in ("--hub", "--listener", "--connector", "--base", "--bind-dn", "--password-file",
                 "exit status", "3 hub unreachable", "4 LDAP session failed"):
        assert word in res.stdout, word
    res = gate("--hub", "http://127.0.0.1:1", "--listener", "nohostport", "--connector", "x",
               "--base", BASE_DN)
    assert res.returncode == 2
    assert "expected HOST:PORT" in res.stderr



# -- the failure signatures of docs/operations.md section 4 --------------------------------------

def test_signature_target_down(tmp_path: Path) -> None:
    """The LDAP server is down behind a healthy agent: the gate exits 4 quoting the hub's
    target_refused count, the agent logs target_failed and the hub's connection_closed says
    outcome=target_refused, as the failure table says."""
    with Deployment(tmp_path, {"addomain": ("127.0.0.1", free_port())}) as d:
        d.start_hub()
        d.start_agent()
        res = gate(*args_for(d))
        assert res.returncode == 4, res.stdout + res.stderr
        assert 'open_failures_total{reason="target_refused"} +1' in res.stderr
        d.wait_for(lambda: bool(d.agent_events("target_failed")), 10, "agent target_failed")
        d.wait_for(lambda: any(e.get("outcome") == "target_refused"
                               for e in d.hub_events("connection_closed")), 10,
                   "hub connection_closed outcome=target_refused")


def test_signature_bad_token(tmp_path: Path, slapd: Slapd) -> None:
    """An agent with a wrong token keeps logging "connecting to cloud" and never "connection
    open"; it logs tunnel_failed with the reason, and the hub logs agent_rejected (bad token)."""
    with Deployment(tmp_path, {"addomain": (slapd.host, slapd.port)}) as d:
        d.start_hub()
        d.start_agent(wait_connected=False, token="not-the-token")
        d.wait_for(lambda: len(d.agent_events("connecting_to_cloud")) >= 2, 15,
                   "two connection attempts")
        d.wait_for(lambda: bool(d.agent_events("tunnel_failed")), 10, "agent tunnel_failed")
        assert not d.agent_events("tunnel_open")
        assert any(e.get("reason") == "bad token" for e in d.hub_events("agent_rejected"))
        assert d.agent_events("tunnel_failed")[0].get("reason")


def test_signature_hub_refuses_agent(tmp_path: Path, slapd: Slapd) -> None:
    """With the hub down, the agent retries ("connecting to cloud" again and again) and says
    why each attempt failed: a tunnel_failed event whose reason names the refused
    connection, so an operator reading the agent log knows the hub is not reachable.
    (Regression: refused connections used to log no reason at all.)"""
    with Deployment(tmp_path, {"addomain": (slapd.host, slapd.port)}) as d:
        d.start_hub()
        d.stop_hub()
        d.start_agent(wait_connected=False)
        d.wait_for(lambda: len(d.agent_events("connecting_to_cloud")) >= 2, 15,
                   "two connection attempts")
        failed = d.agent_events("tunnel_failed")
        assert failed, "no tunnel_failed in the agent log:\n" + d.agent_log_text()[-2000:]
        assert "refused" in str(failed[0].get("reason", "")).lower()

# -- docs/operations.md ---------------------------------------------------------------------------

def doc_blocks(marker: str) -> list[str]:
    """The fenced code blocks that follow C{<!-- marker -->} lines in docs/operations.md."""
    text = DOC.read_text()
    blocks = re.findall(rf"<!-- {re.escape(marker)} -->\n```[a-z]*\n(.*?)```", text, re.S)
    assert blocks, f"no <!-- {marker} --> block in {DOC}"
    return blocks


def doc_commands(marker: str, program: str) -> list[list[str]]:
    """argv of each C{program ...} command line in the marked blocks (continuations joined)."""
    out = []
    for block in doc_blocks(marker):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith(program + " "):
                out.append(shlex.split(line, comments=True))
    assert out, f"no {program} command in <!-- {marker} --> blocks"
    return out


def localize(argv: list[str], d: Deployment) -> list[str]:
    """The doc's production addresses (hub :8765, listener :389) -> this deployment's ports."""
    hub = f"http://127.0.0.1:{d.web_port}"
    listener = f"127.0.0.1:{d.listener_port['addomain']}"
    return [a.replace("http://127.0.0.1:8765", hub).replace("127.0.0.1:389", listener)
            for a in argv]


def test_doc_health_gate_invocation_passes(deployment: Deployment) -> None:
    """The health-gate command of docs/operations.md, run as written (only the hub's and the
    listener's ports swapped for this deployment's), passes against the live deployment."""
    (argv,) = doc_commands("health-gate", "scripts/health-gate")
    assert argv[1:] == ["--hub", "http://127.0.0.1:8765", "--listener", "127.0.0.1:389",
                        "--connector", "addomain", "--base", BASE_DN]
    res = gate(*localize(argv, deployment)[1:])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.rstrip().endswith("health-gate: PASS")


def test_doc_nowconnect_check_invocation_passes(deployment: Deployment) -> None:
    """The `nowconnect check` command of docs/operations.md, with this deployment's ports,
    passes (exit 0) against the live deployment."""
    (argv,) = doc_commands("nowconnect-check", "nowconnect")
    exe = shutil.which("nowconnect", path=str(BIN)) or shutil.which("nowconnect")
    assert exe, f"the nowconnect console script is not installed next to {sys.executable}"
    res = subprocess.run([exe, *localize(argv, deployment)[1:]], capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr


def test_doc_quickstart_runs(tmp_path: Path) -> None:
    """The by-hand validation stack of docs/operations.md, run by one bash as written: its
    quickstart blocks (slapd, config checks, hub, agent, the gate, the log greps), then every
    ping-pong block of section 2 (health-gate, nowconnect check, the curl/ldapsearch lines)
    against that stack, then the stop block.  Only the ports (8765, 389, 1389) become free
    ones and /opt/nowconnect/venv/bin this venv's bin/.  Any failing command fails the run
    (set -euo pipefail); the output must show the gate's PASS and the good-log lines."""
    require_slapd()
    if shutil.which("curl") is None:
        msg = "the quickstart uses curl: apt-get install curl"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    script = "\n".join(b for marker in ("quickstart", "health-gate", "nowconnect-check",
                                         "by-hand", "quickstart-stop")
                       for b in doc_blocks(marker))
    ports = {"1389": free_port(), "8765": free_port(), "389": free_port()}
    for old, new in ports.items():  # 1389 before 389
        script = re.sub(rf"\b{old}\b", str(new), script)
    script = script.replace("/opt/nowconnect/venv/bin", str(BIN))
    # Whatever happens, nothing the doc started outlives the test (slapd daemonizes).
    cleanup = ('cleanup() { kill $(jobs -p) 2>/dev/null || true; '
               'if [ -n "${work:-}" ] && [ -s "$work/slapd/slapd.pid" ]; then '
               'kill "$(cat "$work/slapd/slapd.pid")" 2>/dev/null || true; fi; }\n'
               "trap cleanup EXIT\ntrap 'exit 143' TERM\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NC_")}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.Popen(["bash", "-c", "set -euo pipefail\n" + cleanup + script], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        pytest.fail(f"quickstart still running after 60 s:\n{out}")
    assert proc.returncode == 0, out
    assert out.count("health-gate: PASS") == 2  # block 4 and section 2
    assert "PASS: all 4 checks passed" in out  # nowconnect check
    assert '{"status": "ready"}' in out
    assert ": OK" in out  # --check
    assert "result: 0 Success" in out  # ldapsearch through the hub
    assert re.search(r'^nowconnect_tcp_bytes_total\{connector="addomain",direction="a2c"\} '
                     r'[1-9]', out, re.M)
    for line in ("listener_started connector=addomain", "agent_connected agent_id=dev-agent-1",
                 "connection_open connector=addomain", "connection_closed connector=addomain",
                 "connecting to cloud", "connection open url="):
        assert line in out, line
