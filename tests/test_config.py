"""
Tests for L{nowconnect.config}: pure data in, frozen config or a one-line ConfigError out.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nowconnect.config import (
    AgentAuth,
    AgentConfig,
    ConfigError,
    HubConfig,
    Limits,
    ListenerConfig,
    Target,
    load_agent_config,
    load_hub_config,
    parse_agent_config,
    parse_hub_config,
    parse_target,
)

ETC = Path(__file__).parent.parent / "etc" / "nowconnect"
TOKEN = "s3cret-T0ken-value-xyz"
DIGEST = hashlib.sha256(TOKEN.encode()).hexdigest()


def hub_data(**top: Any) -> dict[str, Any]:
    """A minimal valid hub mapping, with top-level keys replaced by C{top}."""
    data: dict[str, Any] = {
        "listeners": [{"connector": "addomain", "port": 389}],
        "agents": [{"id": "a1", "token_sha256": DIGEST, "connectors": ["addomain"]}],
    }
    data.update(top)
    return data


def agent_data(**top: Any) -> dict[str, Any]:
    """A minimal valid agent mapping, with top-level keys replaced by C{top}."""
    data: dict[str, Any] = {
        "hub_url": "ws://hub:8765/tunnel",
        "agent_id": "a1",
        "token": TOKEN,
        "connectors": {"addomain": "openldap:389"},
    }
    data.update(top)
    return {k: v for k, v in data.items() if v is not None}


def hub_error(data: object) -> ConfigError:
    """Parse C{data} as hub.yaml and return the ConfigError it must raise."""
    with pytest.raises(ConfigError) as info:
        parse_hub_config(data, "hub.yaml")
    return info.value


def agent_error(data: object, environ: dict[str, str] | None = None) -> ConfigError:
    """Parse C{data} as agent.yaml and return the ConfigError it must raise."""
    with pytest.raises(ConfigError) as info:
        parse_agent_config(data, "agent.yaml", environ or {})
    return info.value


# ---- ConfigError ------------------------------------------------------------------------------

def test_config_error_format() -> None:
    """str(ConfigError) is '<source>: <key>: <reason>' on one line, with the parts as attributes."""
    err = ConfigError("hub.yaml", "listeners[0].port", "bad\nthing")
    assert str(err) == "hub.yaml: listeners[0].port: bad thing"
    assert (err.source, err.key, err.reason) == ("hub.yaml", "listeners[0].port", "bad\nthing")


# ---- examples ---------------------------------------------------------------------------------

def test_hub_example_loads() -> None:
    """etc/nowconnect/hub.yaml loads and holds the documented dev configuration."""
    cfg = load_hub_config(str(ETC / "hub.yaml"))
    assert cfg.source == str(ETC / "hub.yaml")
    assert cfg.listen == "tcp:8765"
    assert cfg.listeners == (ListenerConfig(
        "addomain", 389, "0.0.0.0",
        (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.0/8")), False),)
    auth = cfg.agent("dev-agent-1")
    assert auth is not None and auth.connectors == ("addomain",)
    assert auth.token_matches("change-me-dev-token")
    assert cfg.limits == Limits() and cfg.drain_seconds == 10.0
    assert cfg.metrics_allow_cidrs is None and cfg.client_ca is None


def test_agent_example_loads_with_env_token() -> None:
    """
    etc/nowconnect/agent.yaml loads when NC_AGENT_TOKEN is set: the env token wins and the
    (absent) token_file is not read.
    """
    cfg = load_agent_config(str(ETC / "agent.yaml"), {"NC_AGENT_TOKEN": "change-me-dev-token"})
    assert cfg.hub_url == "ws://127.0.0.1:8765/tunnel"
    assert cfg.agent_id == "dev-agent-1"
    assert cfg.token == "change-me-dev-token"
    assert cfg.targets == (Target("addomain", "127.0.0.1", 389),)
    assert cfg.warnings == ()


def test_agent_example_without_token_names_token_file() -> None:
    """Without an env token the example's missing token_file is an error naming token_file."""
    if os.path.exists("/etc/nowconnect/agent.token"):
        pytest.skip("a real token file is installed on this machine")
    with pytest.raises(ConfigError) as info:
        load_agent_config(str(ETC / "agent.yaml"), {})
    assert info.value.key == "token_file"
    assert info.value.reason.startswith("cannot read file: ")


# ---- hub: happy paths -------------------------------------------------------------------------

def test_hub_defaults() -> None:
    """Optional hub keys take their documented defaults."""
    cfg = parse_hub_config(hub_data())
    assert cfg.source == "<string>"
    assert cfg.listen == "tcp:8765"
    (listener,) = cfg.listeners
    assert (listener.bind, listener.allow_cidrs, listener.allow_all) == ("0.0.0.0", (), True)
    assert listener.max_connections == 1000
    assert cfg.limits == Limits()
    assert cfg.drain_seconds == 10.0


def test_hub_all_keys(tmp_path: Path) -> None:
    """Every optional hub key is read; floats accept ints; the digest is stored lower-case."""
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    limits = {"initial_window": 65536, "max_frame": 1024, "max_streams_per_tunnel": 5,
              "max_pending_bytes_per_tunnel": 10, "handshake_timeout": 1, "ping_interval": 2.5,
              "ping_timeout": 3, "idle_timeout": 0, "open_timeout": 4}
    cfg = parse_hub_config(hub_data(
        listen="tcp:0", limits=limits, drain_seconds=0, metrics_allow_cidrs=["::1/128"],
        client_ca=str(ca), tls_cert=str(ca), tls_key=str(ca),
        listeners=[{"connector": "a.b-c_1", "port": 0, "bind": "::", "max_connections": 7},
                   {"connector": "a.b-c_1", "port": 0, "bind": "::"}],
        agents=[{"id": "x@y.z", "token_sha256": DIGEST.upper(), "connectors": ["a.b-c_1"]}]))
    assert cfg.limits == Limits(65536, 1024, 5, 10, 1.0, 2.5, 3.0, 0.0, 4.0)
    assert isinstance(cfg.limits.handshake_timeout, float)
    assert cfg.listen == "tcp:0" and cfg.drain_seconds == 0.0 and cfg.client_ca == str(ca)
    assert cfg.tls_cert == cfg.tls_key == str(ca)
    assert cfg.metrics_allow_cidrs == (ipaddress.ip_network("::1/128"),)
    assert cfg.listeners[0].max_connections == 7
    assert cfg.agents == (AgentAuth("x@y.z", DIGEST, ("a.b-c_1",)),)
    assert cfg.connectors() == ("a.b-c_1",)


def test_hub_agent_lookup() -> None:
    """HubConfig.agent() finds an agent by id and returns None for unknown ids."""
    cfg = parse_hub_config(hub_data())
    assert cfg.agent("a1") == cfg.agents[0]
    assert cfg.agent("nobody") is None


def test_token_matches() -> None:
    """AgentAuth.token_matches compares the token's sha256 with the stored digest."""
    auth = AgentAuth("a1", DIGEST, ("addomain",))
    assert auth.token_matches(TOKEN)
    assert not auth.token_matches(TOKEN + "x")
    assert not auth.token_matches("")
    assert not auth.token_matches("\udcff")


def test_hub_connectors_distinct_in_order() -> None:
    """HubConfig.connectors() lists each listener connector once, in config order."""
    cfg = parse_hub_config(hub_data(listeners=[
        {"connector": "b", "port": 1}, {"connector": "a", "port": 2},
        {"connector": "b", "port": 3}], agents=[
        {"id": "a1", "token_sha256": DIGEST, "connectors": ["a"]}]))
    assert cfg.connectors() == ("b", "a")


def test_ephemeral_ports_may_repeat() -> None:
    """Several listeners on port 0 with the same bind are allowed (each gets its own port)."""
    cfg = parse_hub_config(hub_data(listeners=[
        {"connector": "addomain", "port": 0}, {"connector": "addomain", "port": 0}]))
    assert len(cfg.listeners) == 2


# ---- allows() ---------------------------------------------------------------------------------

def test_allows() -> None:
    """allows() checks the CIDRs; IPv4-mapped IPv6 counts as IPv4; junk is refused."""
    listener = parse_hub_config(hub_data(listeners=[{
        "connector": "addomain", "port": 1, "allow_cidrs": ["10.0.0.0/8", "2001:db8::/32"]}],
    )).listeners[0]
    assert listener.allow_all is False
    assert listener.allows("10.1.2.3")
    assert listener.allows("::ffff:10.1.2.3")
    assert listener.allows("2001:db8::5")
    assert not listener.allows("11.1.2.3")
    assert not listener.allows("::ffff:11.1.2.3")
    assert not listener.allows("::1")
    assert not listener.allows("not-an-ip")
    assert not listener.allows("")


def test_allows_all_when_key_absent() -> None:
    """Without allow_cidrs every parsable or unparsable host is allowed."""
    listener = parse_hub_config(hub_data()).listeners[0]
    assert listener.allow_all
    assert listener.allows("203.0.113.9") and listener.allows("::1")


def test_listener_built_with_cidrs_restricts() -> None:
    """A ListenerConfig constructed with networks defaults allow_all to False."""
    listener = ListenerConfig("x", 1, allow_cidrs=(ipaddress.ip_network("127.0.0.0/8"),))
    assert not listener.allow_all
    assert listener.allows("127.0.0.1") and not listener.allows("10.0.0.1")


# ---- hub: errors ------------------------------------------------------------------------------

def _listener(**kw: Any) -> dict[str, Any]:
    """A hub mapping whose only listener has extra or replaced keys C{kw}."""
    return hub_data(listeners=[{"connector": "addomain", "port": 389, **kw}])


def _agent(**kw: Any) -> dict[str, Any]:
    """A hub mapping whose only agent has C{kw} merged in (None drops a key)."""
    entry = {"id": "a1", "token_sha256": DIGEST, "connectors": ["addomain"], **kw}
    return hub_data(agents=[{k: v for k, v in entry.items() if v is not None}])


HUB_ERRORS = [
    (None, "(top level)", "empty"),
    ([1, 2], "(top level)", "expected a mapping, got list"),
    ("listen: x", "(top level)", "expected a mapping, got string"),
    (hub_data(lissen="tcp:1"), "lissen", "unknown key (expected one of: agents, client_ca, "
     "drain_seconds, limits, listen, listeners, metrics_allow_cidrs, tls_cert, tls_key)"),
    ({"agents": []}, "listeners", "required"),
    (hub_data(listeners=[]), "listeners", "must not be empty"),
    (hub_data(listeners={"a": 1}), "listeners", "expected a list, got mapping"),
    (hub_data(agents=[]), "agents", "must not be empty"),
    (hub_data(listen=""), "listen", "must not be empty"),
    (hub_data(listen=8765), "listen", "expected a string, got integer"),
    (hub_data(listeners=["x"]), "listeners[0]", "expected a mapping, got string"),
    (hub_data(listeners=[{"connector": "a"}]), "listeners[0].port", "required"),
    (hub_data(listeners=[{"port": 1}]), "listeners[0].connector", "required"),
    (_listener(port="389"), "listeners[0].port", "expected an integer, got string"),
    (_listener(port=True), "listeners[0].port", "expected an integer, got boolean"),
    (_listener(port=389.0), "listeners[0].port", "expected an integer, got number"),
    (_listener(port=65536), "listeners[0].port", "between 0 and 65535"),
    (_listener(port=-1), "listeners[0].port", "between 0 and 65535"),
    (_listener(connector="bad name"), "listeners[0].connector", "must match"),
    (_listener(connector="x" * 65), "listeners[0].connector", "must match"),
    (_listener(bind="localhost"), "listeners[0].bind", "not an IP address: localhost"),
    (_listener(prot=1), "listeners[0].prot", "unknown key"),
    (_listener(allow_cidrs=[]), "listeners[0].allow_cidrs", "would block every client"),
    (_listener(allow_cidrs="10.0.0.0/8"), "listeners[0].allow_cidrs", "expected a list"),
    (_listener(allow_cidrs=["10.0.0.0/8", "10.0.0.0/33"]), "listeners[0].allow_cidrs[1]",
     "not a CIDR: 10.0.0.0/33"),
    (_listener(allow_cidrs=["10.0.0.1/8"]), "listeners[0].allow_cidrs[0]",
     "host bits set in 10.0.0.1/8 (did you mean 10.0.0.0/8?)"),
    (_listener(allow_cidrs=[10]), "listeners[0].allow_cidrs[0]", "expected a string"),
    (_listener(max_connections=0), "listeners[0].max_connections", "between 1 and"),
    (hub_data(listeners=[{"connector": "a", "port": 389}, {"connector": "addomain", "port": 389,
                                                           "bind": "0.0.0.0"}]),
     "listeners[1]", "duplicate bind/port 0.0.0.0 389"),
    (hub_data(listeners=[{"connector": "a", "port": 1, "bind": "::0"},
                         {"connector": "b", "port": 1, "bind": "::"}]),
     "listeners[1]", "duplicate bind/port :: 1"),
    (_agent(tokn="x"), "agents[0].tokn",
     "unknown key (expected one of: cert_identity, connectors, exclusive, id, token_sha256)"),
    (_agent(id=None), "agents[0].id", "required"),
    (_agent(id="a b"), "agents[0].id", "must match"),
    (_agent(id="x" * 129), "agents[0].id", "must match"),
    (_agent(token_sha256=None), "agents[0].token_sha256", "required"),
    (_agent(token_sha256=DIGEST[:-1]), "agents[0].token_sha256", "must match"),
    (_agent(token_sha256=DIGEST[:-1] + "g"), "agents[0].token_sha256", "must match"),
    (_agent(connectors=[]), "agents[0].connectors", "must not be empty"),
    (_agent(connectors="addomain"), "agents[0].connectors", "expected a list"),
    (_agent(connectors=["addomain", "ldaps"]), "agents[0].connectors[1]",
     "no listener has connector 'ldaps' (known: addomain)"),
    (_agent(connectors=["addomain", "addomain"]), "agents[0].connectors", "twice"),
    (hub_data(agents=[{"id": "a1", "token_sha256": DIGEST, "connectors": ["addomain"]}] * 2),
     "agents[1].id", "duplicate agent id 'a1'"),
    (hub_data(limits=[]), "limits", "expected a mapping"),
    (hub_data(limits={"max_frames": 1}), "limits.max_frames", "unknown key"),
    (hub_data(limits={"initial_window": 65535}), "limits.initial_window", "between 65536"),
    (hub_data(limits={"max_frame": 1023}), "limits.max_frame", "between 1024 and 16777216"),
    (hub_data(limits={"max_frame": 16777217}), "limits.max_frame", "between 1024 and 16777216"),
    (hub_data(limits={"max_streams_per_tunnel": 0}), "limits.max_streams_per_tunnel", "between"),
    (hub_data(limits={"ping_timeout": 0}), "limits.ping_timeout", "must be > 0"),
    (hub_data(limits={"ping_interval": "15"}), "limits.ping_interval", "expected a number"),
    (hub_data(limits={"handshake_timeout": True}), "limits.handshake_timeout", "expected a num"),
    (hub_data(limits={"open_timeout": float("nan")}), "limits.open_timeout", "must be > 0"),
    (hub_data(limits={"idle_timeout": float("inf")}), "limits.idle_timeout", "must be >= 0"),
    (hub_data(limits={"idle_timeout": -1}), "limits.idle_timeout", "must be >= 0"),
    (hub_data(drain_seconds=-0.5), "drain_seconds", "must be >= 0"),
    (hub_data(metrics_allow_cidrs=[]), "metrics_allow_cidrs", "would block every scraper"),
    (hub_data(metrics_allow_cidrs=["nope"]), "metrics_allow_cidrs[0]", "not a CIDR: nope"),
    (hub_data(client_ca="/nonexistent/ca.pem"), "client_ca", "cannot read file: No such file"),
]


@pytest.mark.parametrize("data, key, reason", HUB_ERRORS)
def test_hub_errors(data: object, key: str, reason: str) -> None:
    """Each invalid hub config raises a ConfigError naming the file, the key path and why."""
    err = hub_error(copy.deepcopy(data))
    assert (err.source, err.key) == ("hub.yaml", key)
    assert reason in err.reason
    assert str(err).startswith(f"hub.yaml: {key}: ")
    assert "\n" not in str(err)


def test_limits_accept_bounds() -> None:
    """Limits accept their documented boundary values."""
    cfg = parse_hub_config(hub_data(limits={"initial_window": 65536, "max_frame": 16777216,
                                            "idle_timeout": 0}))
    assert cfg.limits.initial_window == 65536 and cfg.limits.max_frame == 16777216
    assert cfg.limits.idle_timeout == 0.0
    assert cfg.limits.ping_timeout == 45.0


def test_client_ca_directory_rejected(tmp_path: Path) -> None:
    """client_ca pointing at a directory is rejected as unreadable."""
    err = hub_error(hub_data(client_ca=str(tmp_path)))
    assert err.key == "client_ca" and "cannot read" in err.reason


# ---- hub: files -------------------------------------------------------------------------------

def test_load_hub_missing_file(tmp_path: Path) -> None:
    """A missing hub file is a ConfigError naming the path."""
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_hub_config(path)
    assert info.value.source == path
    assert str(info.value).startswith(f"{path}: (file): cannot read: ")


def test_load_hub_empty_file(tmp_path: Path) -> None:
    """An empty hub file is a ConfigError, not an empty config."""
    path = tmp_path / "hub.yaml"
    path.write_text("# only a comment\n")
    with pytest.raises(ConfigError) as info:
        load_hub_config(str(path))
    assert (info.value.source, info.value.key) == (str(path), "(top level)")
    assert "empty" in info.value.reason


def test_load_hub_yaml_error_names_line_and_column(tmp_path: Path) -> None:
    """Malformed YAML is a one-line ConfigError naming the line and column."""
    path = tmp_path / "hub.yaml"
    path.write_text("listen: tcp:1\nlisteners: [\n  - a: b: c\n")
    with pytest.raises(ConfigError) as info:
        load_hub_config(str(path))
    assert info.value.key == "(yaml)"
    assert "line 3, column" in info.value.reason
    assert "\n" not in str(info.value)


def test_load_hub_duplicate_yaml_key(tmp_path: Path) -> None:
    """A key repeated in one YAML mapping is an error rather than silently overridden."""
    path = tmp_path / "hub.yaml"
    path.write_text("listen: tcp:1\nlisten: tcp:2\n")
    with pytest.raises(ConfigError) as info:
        load_hub_config(str(path))
    assert "line 2, column 1: duplicate key 'listen'" in info.value.reason


def test_load_hub_yaml_merge_keys_allowed(tmp_path: Path) -> None:
    """YAML merge keys (<<) still work with duplicate-key detection."""
    path = tmp_path / "hub.yaml"
    path.write_text(
        "listeners:\n"
        "  - &base {connector: addomain, port: 389, bind: 127.0.0.1}\n"
        "  - {<<: *base, port: 636}\n"
        f"agents: [{{id: a1, token_sha256: '{DIGEST}', connectors: [addomain]}}]\n")
    cfg = load_hub_config(str(path))
    assert [(listener.bind, listener.port) for listener in cfg.listeners] == [
        ("127.0.0.1", 389), ("127.0.0.1", 636)]


def test_load_hub_rejects_unsafe_yaml(tmp_path: Path) -> None:
    """Python-object YAML tags are refused (safe loading)."""
    path = tmp_path / "hub.yaml"
    path.write_text("listen: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError) as info:
        load_hub_config(str(path))
    assert info.value.key == "(yaml)"


# ---- agent: happy paths -----------------------------------------------------------------------

def test_agent_defaults() -> None:
    """Optional agent keys take their documented defaults."""
    cfg = parse_agent_config(agent_data())
    assert cfg.source == "<string>"
    assert (cfg.connect_timeout, cfg.reconnect_initial_delay, cfg.reconnect_max_delay) == (
        10.0, 1.0, 60.0)
    assert cfg.metrics_listen is None and cfg.ca_file is None
    assert cfg.client_cert is None and cfg.client_key is None
    assert cfg.drain_seconds == 10.0 and cfg.warnings == ()
    assert cfg.target("addomain") == Target("addomain", "openldap", 389)
    assert cfg.target("other") is None
    assert cfg.connectors() == ("addomain",)


def test_agent_all_keys(tmp_path: Path) -> None:
    """Every optional agent key is read, and TLS files must exist."""
    files = {}
    for name in ("ca", "crt", "key"):
        files[name] = tmp_path / name
        files[name].write_text("x")
    cfg = parse_agent_config(agent_data(
        hub_url="wss://hub.example.com", connect_timeout=2, reconnect_initial_delay=0.5,
        reconnect_max_delay=0.5, metrics_listen="tcp:9765:interface=127.0.0.1",
        ca_file=str(files["ca"]), client_cert=str(files["crt"]), client_key=str(files["key"]),
        drain_seconds=0, connectors={"b": "[::1]:636", "a": "10.0.0.5:389"}))
    assert cfg.hub_url == "wss://hub.example.com/tunnel"
    assert (cfg.connect_timeout, cfg.reconnect_initial_delay, cfg.reconnect_max_delay) == (
        2.0, 0.5, 0.5)
    assert cfg.metrics_listen == "tcp:9765:interface=127.0.0.1"
    assert (cfg.ca_file, cfg.client_cert, cfg.client_key) == (
        str(files["ca"]), str(files["crt"]), str(files["key"]))
    assert cfg.targets == (Target("b", "::1", 636), Target("a", "10.0.0.5", 389))
    assert cfg.connectors() == ("b", "a")
    assert cfg.warnings == ()


def test_hub_url_path_kept() -> None:
    """A hub_url with a path, port and query keeps them; only an empty path becomes /tunnel."""
    cfg = parse_agent_config(agent_data(hub_url="ws://[::1]:8765/x/tunnel?v=1"))
    assert cfg.hub_url == "ws://[::1]:8765/x/tunnel?v=1"
    cfg = parse_agent_config(agent_data(hub_url="ws://hub:80"))
    assert cfg.hub_url == "ws://hub:80/tunnel"


def test_tls_on_plain_ws_warns(tmp_path: Path) -> None:
    """TLS files with a ws:// hub_url are accepted but produce a warning."""
    ca = tmp_path / "ca"
    ca.write_text("x")
    cfg = parse_agent_config(agent_data(ca_file=str(ca)), "agent.yaml")
    assert cfg.warnings == (
        "agent.yaml: ca_file/client_cert: TLS settings have no effect with a ws:// hub_url",)


# ---- agent: environment -----------------------------------------------------------------------

def test_env_overrides_file() -> None:
    """NC_* environment variables win over the file's values."""
    cfg = parse_agent_config(agent_data(), "agent.yaml", {
        "NC_HUB_URL": "wss://other:443/t", "NC_AGENT_ID": "env-agent",
        "NC_AGENT_TOKEN": "env-token", "NC_CONNECTORS": "x=h1:1, y=[fd00::1]:2,"})
    assert cfg.hub_url == "wss://other:443/t"
    assert cfg.agent_id == "env-agent"
    assert cfg.token == "env-token"
    assert cfg.targets == (Target("x", "h1", 1), Target("y", "fd00::1", 2))


def test_env_only() -> None:
    """load_agent_config(None, environ) builds the config from the environment alone."""
    cfg = load_agent_config(None, {"NC_HUB_URL": "ws://hub", "NC_AGENT_ID": "a",
                                   "NC_AGENT_TOKEN": "t", "NC_CONNECTORS": "addomain=ldap:389"})
    assert cfg.source == "environment"
    assert cfg.hub_url == "ws://hub/tunnel"
    assert cfg.targets == (Target("addomain", "ldap", 389),)


def test_env_only_missing_key_mentions_variable() -> None:
    """A key missing from both file and environment names the variable that could set it."""
    with pytest.raises(ConfigError) as info:
        load_agent_config(None, {"NC_AGENT_ID": "a", "NC_AGENT_TOKEN": "t",
                                 "NC_CONNECTORS": "addomain=ldap:389"})
    assert str(info.value) == "environment: hub_url: required (or set NC_HUB_URL)"


def test_empty_env_var_is_unset() -> None:
    """An environment variable set to '' does not override the file."""
    cfg = parse_agent_config(agent_data(), "agent.yaml", {"NC_HUB_URL": "", "NC_AGENT_TOKEN": ""})
    assert cfg.hub_url == "ws://hub:8765/tunnel" and cfg.token == TOKEN


@pytest.mark.parametrize("value", [
    "addomain", "addomain=", "=h:1", "addomain=h", "addomain=h:0", "bad name=h:1",
    "a=h:1,a=h:2", ",", "a=h:1,b"])
def test_env_connectors_malformed(value: str) -> None:
    """A malformed NC_CONNECTORS is a ConfigError from 'environment' naming NC_CONNECTORS."""
    err = agent_error(agent_data(), {"NC_CONNECTORS": value})
    assert (err.source, err.key) == ("environment", "NC_CONNECTORS")


def test_env_connectors_error_names_entry() -> None:
    """A bad NC_CONNECTORS entry is reported by its position."""
    err = agent_error(agent_data(), {"NC_CONNECTORS": "a=h:1,b=h:99999"})
    assert str(err) == "environment: NC_CONNECTORS: entry 2: port must be between 1 and 65535"


def test_env_only_token_file(tmp_path: Path) -> None:
    """With no file, NC_AGENT_TOKEN_FILE supplies the token (and its mode warning)."""
    path = tmp_path / "t"
    path.write_text("tok\n")
    path.chmod(0o604)
    cfg = load_agent_config(None, {"NC_HUB_URL": "ws://h", "NC_AGENT_ID": "a",
                                   "NC_AGENT_TOKEN_FILE": str(path), "NC_CONNECTORS": "a=h:1"})
    assert cfg.token == "tok"
    assert cfg.warnings == (f"{path}: token_file: mode 0604 is wider than 0600",)


@pytest.mark.parametrize("var, value", [
    ("NC_HUB_URL", "http://hub/tunnel"), ("NC_AGENT_ID", "a b"),
    ("NC_AGENT_TOKEN_FILE", "/nonexistent/token")])
def test_env_values_validated(var: str, value: str) -> None:
    """Bad values from the environment are errors from 'environment' naming the variable."""
    err = agent_error(agent_data(), {var: value})
    assert (err.source, err.key) == ("environment", var)


def test_file_values_validated_even_when_overridden() -> None:
    """A wrongly typed file value is an error even though the environment overrides it."""
    err = agent_error(agent_data(hub_url=1), {"NC_HUB_URL": "ws://hub"})
    assert (err.source, err.key) == ("agent.yaml", "hub_url")


# ---- agent: token -----------------------------------------------------------------------------

def test_token_file(tmp_path: Path) -> None:
    """token_file is read and trailing whitespace is stripped; mode 0600 gives no warning."""
    path = tmp_path / "agent.token"
    path.write_text(TOKEN + " \n\n")
    path.chmod(0o600)
    cfg = parse_agent_config(agent_data(token=None, token_file=str(path)))
    assert cfg.token == TOKEN and cfg.warnings == ()


def test_token_file_wide_mode_warns(tmp_path: Path) -> None:
    """A token_file readable by group or others loads, with a warning in warnings."""
    path = tmp_path / "agent.token"
    path.write_text(TOKEN)
    path.chmod(0o644)
    cfg = parse_agent_config(agent_data(token=None, token_file=str(path)))
    assert cfg.token == TOKEN
    assert cfg.warnings == (f"{path}: token_file: mode 0644 is wider than 0600",)
    path.chmod(0o640)
    cfg = parse_agent_config(agent_data(token=None, token_file=str(path)))
    assert "mode 0640" in cfg.warnings[0]


def test_env_token_file_beats_file_token(tmp_path: Path) -> None:
    """NC_AGENT_TOKEN_FILE wins over the file's token; NC_AGENT_TOKEN wins over both."""
    path = tmp_path / "t"
    path.write_text("from-env-file\n")
    path.chmod(0o600)
    cfg = parse_agent_config(agent_data(), "agent.yaml", {"NC_AGENT_TOKEN_FILE": str(path)})
    assert cfg.token == "from-env-file"
    cfg = parse_agent_config(agent_data(), "agent.yaml",
                             {"NC_AGENT_TOKEN_FILE": str(path), "NC_AGENT_TOKEN": "e"})
    assert cfg.token == "e"


def test_env_token_means_token_file_not_read(tmp_path: Path) -> None:
    """With NC_AGENT_TOKEN set, an unreadable token_file in the file is not touched."""
    data = agent_data(token=None, token_file=str(tmp_path / "missing"))
    assert parse_agent_config(data, "agent.yaml", {"NC_AGENT_TOKEN": "e"}).token == "e"


def test_token_and_token_file_conflict(tmp_path: Path) -> None:
    """Setting both token and token_file in the file is an error."""
    err = agent_error(agent_data(token_file=str(tmp_path / "t")))
    assert err.key == "token_file" and "only one of token and token_file" in err.reason


def test_token_file_not_utf8(tmp_path: Path) -> None:
    """A token_file that is not UTF-8 text is an error naming token_file."""
    path = tmp_path / "t"
    path.write_bytes(b"\xff\xfe")
    err = agent_error(agent_data(token=None, token_file=str(path)))
    assert (err.key, err.reason) == ("token_file", "file is not UTF-8 text")


def test_token_required() -> None:
    """With no token, token_file or env token the error names token."""
    err = agent_error(agent_data(token=None))
    assert err.key == "token" and err.reason.startswith("required")


def test_token_file_missing_and_empty(tmp_path: Path) -> None:
    """An unreadable or empty token_file is an error naming token_file and the path."""
    missing = str(tmp_path / "missing")
    err = agent_error(agent_data(token=None, token_file=missing))
    assert err.key == "token_file" and "cannot read file: " in err.reason
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    err = agent_error(agent_data(token=None, token_file=str(empty)))
    assert err.key == "token_file" and err.reason == "file is empty"


# ---- agent: errors ----------------------------------------------------------------------------

AGENT_ERRORS = [
    (None, "(top level)", "empty"),
    ("x", "(top level)", "expected a mapping"),
    (agent_data(hub_ur="ws://x"), "hub_ur", "unknown key (expected one of: agent_id, ca_file, "),
    (agent_data(hub_url=None), "hub_url", "required (or set NC_HUB_URL)"),
    (agent_data(hub_url="http://hub/tunnel"), "hub_url", "ws:// or wss://"),
    (agent_data(hub_url="ws:///tunnel"), "hub_url", "with a host"),
    (agent_data(hub_url="ws://hub:99999/"), "hub_url", "not a valid URL"),
    (agent_data(hub_url="ws://[::1/"), "hub_url", "not a valid URL"),
    (agent_data(hub_url="ws://u:p@hub/"), "hub_url", "credentials"),
    (agent_data(agent_id=None), "agent_id", "required (or set NC_AGENT_ID)"),
    (agent_data(agent_id=7), "agent_id", "expected a string, got integer"),
    (agent_data(connectors=None), "connectors", "required (or set NC_CONNECTORS)"),
    (agent_data(connectors={}), "connectors", "at least one"),
    (agent_data(connectors=["a"]), "connectors", "expected a mapping"),
    (agent_data(connectors={"a": "h"}), "connectors.a", "expected host:port"),
    (agent_data(connectors={"a": "h:0"}), "connectors.a", "between 1 and 65535"),
    (agent_data(connectors={"a": "h:65536"}), "connectors.a", "between 1 and 65535"),
    (agent_data(connectors={"a": 389}), "connectors.a", "expected a string"),
    (agent_data(connectors={"a": "::1:389"}), "connectors.a", "expected host:port"),
    (agent_data(connectors={"a": "[zz]:389"}), "connectors.a", "IPv6"),
    (agent_data(connectors={"a b": "h:1"}), "connectors.a b", "connector name must match"),
    (agent_data(connectors={1: "h:1"}), "connectors.1", "connector name must match"),
    (agent_data(token=1), "token", "expected a string, got integer"),
    (agent_data(token=""), "token", "must not be empty"),
    (agent_data(token=None, token_file=3), "token_file", "expected a string"),
    (agent_data(connect_timeout=0), "connect_timeout", "must be > 0"),
    (agent_data(connect_timeout=True), "connect_timeout", "expected a number"),
    (agent_data(reconnect_initial_delay=5, reconnect_max_delay=4), "reconnect_max_delay",
     "must be >= 5"),
    (agent_data(drain_seconds=-1), "drain_seconds", "must be >= 0"),
    (agent_data(metrics_listen=""), "metrics_listen", "must not be empty"),
    (agent_data(ca_file="/nonexistent"), "ca_file", "cannot read file: No such file"),
    (agent_data(client_key=__file__), "client_cert", "must be set together"),
    (agent_data(client_cert=__file__), "client_key", "must be set together"),
]


@pytest.mark.parametrize("data, key, reason", AGENT_ERRORS)
def test_agent_errors(data: object, key: str, reason: str) -> None:
    """Each invalid agent config raises a ConfigError naming the file, the key path and why."""
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if v is not None}
    err = agent_error(data)
    assert (err.source, err.key) == ("agent.yaml", key)
    assert reason in err.reason
    assert str(err).startswith(f"agent.yaml: {key}: ")


def test_load_agent_missing_file(tmp_path: Path) -> None:
    """A missing agent file is a ConfigError naming the path, even with env overrides."""
    path = str(tmp_path / "agent.yaml")
    with pytest.raises(ConfigError) as info:
        load_agent_config(path, {"NC_AGENT_TOKEN": "t"})
    assert info.value.source == path and info.value.key == "(file)"


def test_load_agent_empty_file(tmp_path: Path) -> None:
    """An empty agent file is an error even if the environment could fill every key."""
    path = tmp_path / "agent.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        load_agent_config(str(path), {"NC_HUB_URL": "ws://h", "NC_AGENT_ID": "a",
                                      "NC_AGENT_TOKEN": "t", "NC_CONNECTORS": "a=h:1"})
    assert "empty" in info.value.reason


# ---- the token never leaks --------------------------------------------------------------------

def test_repr_hides_token() -> None:
    """repr() and str() of an AgentConfig do not contain the token."""
    cfg = parse_agent_config(agent_data())
    assert TOKEN not in repr(cfg) and TOKEN not in str(cfg)
    assert "hub_url=" in repr(cfg)


LEAKS = [
    (agent_data(agent_id=TOKEN + "!"), {}),
    (agent_data(connectors={"a": TOKEN}), {}),
    (agent_data(connectors={TOKEN + "!": "h:1"}), {}),
    (agent_data(hub_url=TOKEN), {}),
    (agent_data(hub_url=f"ws://x:{TOKEN}@hub/"), {}),
    (agent_data(metrics_listen=""), {}),
    (agent_data(token=None, token_file=TOKEN), {}),
    (agent_data(connectors={f"{TOKEN}:1": "h:1"}), {}),
    (agent_data(), {"NC_CONNECTORS": TOKEN}),
    (agent_data(), {"NC_CONNECTORS": f"a={TOKEN}"}),
    (agent_data(), {"NC_HUB_URL": TOKEN}),
    (agent_data(), {"NC_AGENT_ID": TOKEN + " "}),
    (agent_data(token=None, hub_url=TOKEN), {"NC_AGENT_TOKEN": TOKEN}),
    (agent_data(token=None, agent_id=f"{TOKEN} x"), {"NC_AGENT_TOKEN": TOKEN}),
]


@pytest.mark.parametrize("data, environ", LEAKS)
def test_errors_never_contain_token(data: dict[str, Any], environ: dict[str, str]) -> None:
    """A token placed in a wrong position never appears in the ConfigError's str or repr."""
    data = {k: v for k, v in data.items() if v is not None}
    err = agent_error(data, environ)
    for text in (str(err), repr(err), err.key, err.reason, repr(err.args)):
        assert TOKEN not in text


def test_token_file_contents_never_leak(tmp_path: Path) -> None:
    """A token read from token_file and misused elsewhere is scrubbed from errors."""
    path = tmp_path / "t"
    path.write_text(TOKEN)
    path.chmod(0o600)
    err = agent_error(agent_data(token=None, token_file=str(path),
                                 connect_timeout=0, connectors={"a": "h:1"}))
    assert err.key == "connect_timeout"
    assert TOKEN not in str(err)


def test_token_in_yaml_error_not_echoed(tmp_path: Path) -> None:
    """A YAML syntax error on the token's line reports line/column, not the line's text."""
    path = tmp_path / "agent.yaml"
    path.write_text(f'hub_url: ws://h\ntoken: "{TOKEN}\n')
    with pytest.raises(ConfigError) as info:
        load_agent_config(str(path), {})
    assert TOKEN not in str(info.value)
    assert info.value.key == "(yaml)" and "line " in info.value.reason


# ---- parse_target -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("openldap:389", ("openldap", 389)),
    ("10.0.0.5:636", ("10.0.0.5", 636)),
    ("[::1]:389", ("::1", 389)),
    ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
    ("dc01.corp.example.com.:1", ("dc01.corp.example.com.", 1)),
    ("my_host-1:80", ("my_host-1", 80)),
])
def test_parse_target(text: str, expected: tuple[str, int]) -> None:
    """parse_target splits host:port and [v6]:port, unbracketing IPv6."""
    assert parse_target(text) == expected


@pytest.mark.parametrize("text", [
    "", "host", ":389", "host:", "host:0", "host:65536", "host:+1", "host: 1", "::1:389",
    "[::1]", "[::1]389", "[nothost]:1", "[10.0.0.1]:1", "bad host:1", "-host:1", "a..b:1",
    "host:٣٨٩", "host:389\n", "x" * 254 + ":1"])
def test_parse_target_rejects(text: str) -> None:
    """parse_target raises ValueError on malformed input without echoing it."""
    with pytest.raises(ValueError) as info:
        parse_target(text)
    assert str(info.value) in {
        "expected host:port or [IPv6]:port", "not an IPv6 address inside [...]",
        "not a valid host name or IPv4 address", "port must be between 1 and 65535"}


def test_config_imports_no_twisted() -> None:
    """nowconnect.config is pure: importing it loads no Twisted module."""
    code = ("import sys, nowconnect.config; "
            "sys.exit(any(m.split('.')[0] == 'twisted' for m in sys.modules))")
    root = str(Path(__file__).parent.parent)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root,
                   env={**os.environ, "PYTHONPATH": root})


def test_values_are_frozen() -> None:
    """Config objects are immutable."""
    cfg = parse_hub_config(hub_data())
    with pytest.raises(AttributeError):
        cfg.listen = "x"  # type: ignore[misc]
    assert isinstance(cfg, HubConfig)
    agent = parse_agent_config(agent_data())
    assert isinstance(agent, AgentConfig)
    with pytest.raises(AttributeError):
        agent.token = "x"  # type: ignore[misc]


def test_hub_tls_rules(tmp_path: Path) -> None:
    """
    tls_cert/tls_key go together and not with an ssl: listen; client_ca and cert_identity
    need them.
    """
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    p = str(pem)
    assert hub_error(hub_data(tls_cert=p)).key == "tls_key"
    assert hub_error(hub_data(tls_key=p)).key == "tls_cert"
    err = hub_error(hub_data(tls_cert=p, tls_key=p, listen="ssl:8765:privateKey=k"))
    assert err.key == "tls_cert" and "already a TLS endpoint" in err.reason
    err = hub_error(hub_data(client_ca=p))
    assert err.key == "client_ca" and "needs tls_cert" in err.reason
    agents = [{"id": "a", "token_sha256": DIGEST, "connectors": ["addomain"],
               "cert_identity": "agent.example.org"}]
    err = hub_error(hub_data(agents=agents))
    assert err.key == "agents[0].cert_identity" and "client_ca" in err.reason
    cfg = parse_hub_config(hub_data(agents=[{**agents[0], "exclusive": True}], client_ca=p,
                                    tls_cert=p, tls_key=p))
    assert cfg.agents[0].cert_identity == "agent.example.org" and cfg.agents[0].exclusive
    err = hub_error(hub_data(agents=[{**agents[0], "exclusive": "yes"}], client_ca=p,
                             tls_cert=p, tls_key=p))
    assert err.key == "agents[0].exclusive" and "true or false" in err.reason
