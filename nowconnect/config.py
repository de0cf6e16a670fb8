"""
Load and validate hub and agent configuration into frozen value objects.

YAML (or an already-parsed mapping) goes in; a L{HubConfig} or L{AgentConfig} comes out, or a
L{ConfigError} whose C{str} is one line, C{<source>: <key>: <reason>}. Unknown keys are rejected
at every level, types are strict (a boolean is not an integer, C{"389"} is not a port) and the
agent's token never appears in an exception, a warning or a C{repr}.  No Twisted imports: this is
pure data.

Relative paths (C{client_ca}, C{token_file}, ...) are relative to the working directory.
An environment variable set to the empty string counts as unset.
"""
# -*- test-case-name: tests.test_config -*-

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeAlias, TypeVar
from urllib.parse import urlsplit, urlunsplit

import attrs
import yaml

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
_T = TypeVar("_T")
_D = TypeVar("_D")
_Conv = Callable[[object, "_At"], _T]
_MISSING: Any = object()
_CONNECTOR_RE = r"[A-Za-z0-9_.-]{1,64}"
_AGENT_ID_RE = r"[A-Za-z0-9_.@-]{1,128}"
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOSTNAME_RE = rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?"


class ConfigError(Exception):
    """
    Invalid configuration. C{str(err)} is one line, C{'<source>: <key>: <reason>'}, e.g.
    C{'hub.yaml: listeners[0].allow_cidrs[1]: not a CIDR: 10.0.0.0/33'}.
    """

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(source, key, reason)
        self.source, self.key, self.reason = source, key, reason

    def __str__(self) -> str:
        return " ".join(f"{self.source}: {self.key}: {self.reason}".splitlines())


@attrs.frozen
class _At:
    """Where a value came from: a source (file or C{environment}) and a key path in it."""

    source: str
    key: str

    def __call__(self, reason: str) -> ConfigError:
        return ConfigError(self.source, self.key or "(top level)", reason)

    def child(self, name: str) -> _At:
        return _At(self.source, f"{self.key}.{name}" if self.key else name)

    def item(self, index: int) -> _At:
        return _At(self.source, f"{self.key}[{index}]")


class _Section:
    """A mapping whose keys are checked against C{keys} up front and then popped one by one."""

    def __init__(self, data: object, at: _At, keys: tuple[str, ...]) -> None:
        if not isinstance(data, dict):
            raise at(f"expected a mapping, got {_kind(data)}")
        for key in data:
            if key not in keys:
                expected = ", ".join(sorted(keys))
                raise at.child(str(key))(f"unknown key (expected one of: {expected})")
        self._data: dict[object, object] = dict(data)
        self.at = at

    def get(self, name: str, conv: _Conv[_T], default: _D = _MISSING) -> _T | _D:
        """Convert key C{name} with C{conv}; C{default} if absent (required if no default)."""
        value = self._data.pop(name, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise self.at.child(name)("required")
            return default
        return conv(value, self.at.child(name))


def _kind(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
             dict: "mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# Converters: (value, where) -> typed value, raising ConfigError.  They never echo a value that
# could be a secret (not even file paths: a token pasted into token_file is a likely slip);
# CIDRs and IP literals are echoed because they help and are not secrets.

def _str(value: object, at: _At) -> str:
    if not isinstance(value, str):
        raise at(f"expected a string, got {_kind(value)}")
    if not value:
        raise at("must not be empty")
    return value


def _bool(value: object, at: _At) -> bool:
    if not isinstance(value, bool):
        raise at(f"expected true or false, got {_kind(value)}")
    return value


def _int(lo: int, hi: int) -> _Conv[int]:
    def conv(value: object, at: _At) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise at(f"expected an integer, got {_kind(value)}")
        if not lo <= value <= hi:
            raise at(f"must be between {lo} and {hi}, got {value}")
        return value
    return conv


def _float(lo: float, *, allow_lo: bool) -> _Conv[float]:
    def conv(value: object, at: _At) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise at(f"expected a number, got {_kind(value)}")
        if not math.isfinite(value) or value < lo or (value == lo and not allow_lo):
            raise at(f"must be {'>=' if allow_lo else '>'} {lo:g}, got {value}")
        return float(value)
    return conv


def _matching(pattern: str) -> _Conv[str]:
    def conv(value: object, at: _At) -> str:
        text = _str(value, at)
        if not re.fullmatch(pattern, text):
            raise at(f"must match {pattern}")
        return text
    return conv


def _list(item: _Conv[_T], *, empty: str = "must not be empty") -> _Conv[tuple[_T, ...]]:
    def conv(value: object, at: _At) -> tuple[_T, ...]:
        if not isinstance(value, list):
            raise at(f"expected a list, got {_kind(value)}")
        if not value:
            raise at(empty)
        return tuple(item(v, at.item(i)) for i, v in enumerate(value))
    return conv


def _ip(value: object, at: _At) -> str:
    try:
        return str(ipaddress.ip_address(_str(value, at)))
    except ValueError:
        raise at(f"not an IP address: {value}") from None


def _cidr(value: object, at: _At) -> Network:
    text = _str(value, at)
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            fixed = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise at(f"not a CIDR: {text}") from None
        raise at(f"host bits set in {text} (did you mean {fixed}?)") from None


_cidrs = _list(_cidr, empty="empty list would block every client; omit the key to allow all")


def _readable(value: object, at: _At) -> str:
    path = _str(value, at)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise at(f"cannot read file: {e.strerror}") from None
    return path


def parse_target(text: str) -> tuple[str, int]:
    """
    Split C{"host:port"} or C{"[v6]:port"} into C{(host, port)}; the host comes back without
    brackets. Raise C{ValueError} (whose message does not repeat C{text}) when malformed.
    """
    m = re.fullmatch(r"\[([^\]]+)\]:([0-9]{1,5})|([^:\[\]]+):([0-9]{1,5})", text)
    if m is None:
        raise ValueError("expected host:port or [IPv6]:port")
    host, port = (m[1], m[2]) if m[1] is not None else (m[3], m[4])
    if m[1] is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("not an IPv6 address inside [...]") from None
    elif not re.fullmatch(_HOSTNAME_RE, host):
        raise ValueError("not a valid host name or IPv4 address")
    if not 1 <= int(port) <= 65535:
        raise ValueError("port must be between 1 and 65535")
    return host, int(port)


@attrs.frozen
class Limits:
    """Hub flow-control and timing limits (YAML key C{limits:}); times are seconds.

    C{ping_timeout} only has to be positive; set it above C{ping_interval} or a healthy but quiet
    tunnel is dropped. C{idle_timeout} 0 disables the per-stream idle timeout; the default is
    above Active Directory's 900 s idle limit so AD closes first.
    """

    initial_window: int = 1048576
    max_frame: int = 262144
    max_streams_per_tunnel: int = 10000
    max_pending_bytes_per_tunnel: int = 268435456
    handshake_timeout: float = 10.0
    ping_interval: float = 15.0
    ping_timeout: float = 45.0
    idle_timeout: float = 3600.0
    open_timeout: float = 15.0
    auth_failures_before_backoff: int = 5
    auth_backoff_max: float = 300.0


_LIMIT_RULES: dict[str, _Conv[Any]] = {
    "initial_window": _int(65536, 2**31 - 1),
    "max_frame": _int(1024, 16777216),
    "max_streams_per_tunnel": _int(1, 2**31 - 1),
    "max_pending_bytes_per_tunnel": _int(1, 2**63 - 1),
    "handshake_timeout": _float(0, allow_lo=False),
    "ping_interval": _float(0, allow_lo=False),
    "ping_timeout": _float(0, allow_lo=False),
    "idle_timeout": _float(0, allow_lo=True),
    "open_timeout": _float(0, allow_lo=False),
    "auth_failures_before_backoff": _int(1, 2**31 - 1),
    "auth_backoff_max": _float(0, allow_lo=False),
}


@attrs.frozen
class ListenerConfig:
    """A hub TCP listener for one connector.

    C{allow_all} defaults to "no C{allow_cidrs} given", so building one with networks restricts it.
    """

    connector: str
    port: int
    bind: str = "0.0.0.0"
    allow_cidrs: tuple[Network, ...] = ()
    allow_all: bool = attrs.field(
        default=attrs.Factory(lambda self: not self.allow_cidrs, takes_self=True))
    max_connections: int = 1000

    def allows(self, host: str) -> bool:
        """May a client at C{host} connect? IPv4-mapped IPv6 is also checked as IPv4."""
        if self.allow_all:
            return True
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        addrs = [addr] + ([addr.ipv4_mapped] if isinstance(addr, ipaddress.IPv6Address)
                          and addr.ipv4_mapped else [])
        return any(a in net for a in addrs for net in self.allow_cidrs)


@attrs.frozen
class AgentAuth:
    """An agent the hub accepts, and the connectors it may serve."""

    id: str
    token_sha256: str
    connectors: tuple[str, ...]
    #: With mutual TLS: the DNS name (or CN) the agent's client certificate must carry.
    cert_identity: str | None = None
    #: A new tunnel for this id replaces the old one instead of running beside it (HA default).
    exclusive: bool = False

    def token_matches(self, token: str) -> bool:
        """Constant-time check of C{token} against the stored SHA-256."""
        try:
            digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(digest, self.token_sha256)


@attrs.frozen
class HubConfig:
    """The validated hub configuration."""

    source: str
    listen: str
    listeners: tuple[ListenerConfig, ...]
    agents: tuple[AgentAuth, ...]
    limits: Limits = Limits()
    drain_seconds: float = 10.0
    metrics_allow_cidrs: tuple[Network, ...] | None = None
    client_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def agent(self, agent_id: str) -> AgentAuth | None:
        return next((a for a in self.agents if a.id == agent_id), None)

    def connectors(self) -> tuple[str, ...]:
        """Distinct listener connectors, in config order."""
        return tuple(dict.fromkeys(listener.connector for listener in self.listeners))


def _listener(value: object, at: _At) -> ListenerConfig:
    s = _Section(value, at, ("allow_cidrs", "bind", "connector", "max_connections", "port"))
    connector = s.get("connector", _matching(_CONNECTOR_RE))
    port = s.get("port", _int(0, 65535))
    bind = s.get("bind", _ip, "0.0.0.0")
    cidrs = s.get("allow_cidrs", _cidrs, None)
    max_conn = s.get("max_connections", _int(1, 2**31 - 1), 1000)
    return ListenerConfig(connector, port, bind, cidrs or (), cidrs is None, max_conn)


def parse_hub_config(data: object, source: str = "<string>") -> HubConfig:
    """Validate parsed YAML C{data} into a L{HubConfig}; L{ConfigError} names C{source} and key."""
    if data is None:
        raise ConfigError(source, "(top level)", "empty configuration")
    s = _Section(data, _At(source, ""), ("agents", "client_ca", "drain_seconds", "limits",
                                         "listen", "listeners", "metrics_allow_cidrs",
                                         "tls_cert", "tls_key"))
    listen = s.get("listen", _str, "tcp:8765")
    listeners = s.get("listeners", _list(_listener))
    seen: set[tuple[str, int]] = set()
    for i, listener in enumerate(listeners):
        if listener.port and (listener.bind, listener.port) in seen:
            raise s.at.child("listeners").item(i)(
                f"duplicate bind/port {listener.bind} {listener.port}")
        seen.add((listener.bind, listener.port))
    known = tuple(dict.fromkeys(listener.connector for listener in listeners))

    def connector(value: object, at: _At) -> str:
        name = _str(value, at)
        if name not in known:
            raise at(f"no listener has connector {name!r} (known: {', '.join(known)})")
        return name

    def agent(value: object, at: _At) -> AgentAuth:
        a = _Section(value, at, ("cert_identity", "connectors", "exclusive", "id",
                                 "token_sha256"))
        agent_id = a.get("id", _matching(_AGENT_ID_RE))
        digest = a.get("token_sha256", _matching(r"[0-9A-Fa-f]{64}")).lower()
        connectors = a.get("connectors", _list(connector))
        if len(set(connectors)) != len(connectors):
            raise at.child("connectors")("lists a connector twice")
        identity = a.get("cert_identity", _str, None)
        if identity is not None and not client_ca_given:
            raise at.child("cert_identity")("needs client_ca (mutual TLS) on the hub")
        exclusive = a.get("exclusive", _bool, False)
        return AgentAuth(agent_id, digest, connectors, identity, exclusive)

    client_ca_given = isinstance(data, dict) and data.get("client_ca") is not None

    agents = s.get("agents", _list(agent))
    for i, auth in enumerate(agents):
        if any(other.id == auth.id for other in agents[:i]):
            raise s.at.child("agents").item(i).child("id")(f"duplicate agent id {auth.id!r}")
    limits = s.get("limits", _limit_section, Limits())
    drain = s.get("drain_seconds", _float(0, allow_lo=True), 10.0)
    metrics = s.get("metrics_allow_cidrs", _list(_cidr, empty="empty list would block every "
                                                 "scraper; omit the key to allow all"), None)
    client_ca = s.get("client_ca", _readable, None)
    tls_cert = s.get("tls_cert", _readable, None)
    tls_key = s.get("tls_key", _readable, None)
    if (tls_cert is None) != (tls_key is None):
        raise s.at.child("tls_key" if tls_key is None else "tls_cert")(
            "tls_cert and tls_key must be set together")
    if tls_cert is not None and listen.startswith(("ssl:", "tls:")):
        raise s.at.child("tls_cert")(
            "listen is already a TLS endpoint; use a tcp: endpoint with tls_cert/tls_key")
    if client_ca is not None and tls_cert is None:
        raise s.at.child("client_ca")(
            "mutual TLS needs tls_cert and tls_key (with a tcp: listen endpoint)")
    return HubConfig(source, listen, listeners, agents, limits, drain, metrics, client_ca,
                     tls_cert, tls_key)


def _limit_section(value: object, at: _At) -> Limits:
    s = _Section(value, at, tuple(_LIMIT_RULES))
    given = {name: s.get(name, conv, None) for name, conv in _LIMIT_RULES.items()}
    return Limits(**{name: v for name, v in given.items() if v is not None})


@attrs.frozen
class Target:
    """Where the agent dials for a connector."""

    connector: str
    host: str
    port: int


@attrs.frozen
class AgentConfig:
    """The validated agent configuration. C{token} is the secret and is left out of C{repr}."""

    source: str
    hub_url: str
    agent_id: str
    token: str = attrs.field(repr=False)
    targets: tuple[Target, ...]
    connect_timeout: float = 10.0
    reconnect_initial_delay: float = 1.0
    reconnect_max_delay: float = 60.0
    metrics_listen: str | None = None
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    drain_seconds: float = 10.0
    handshake_timeout: float = 10.0
    ping_interval: float = 15.0
    ping_timeout: float = 45.0
    warnings: tuple[str, ...] = ()

    def target(self, connector: str) -> Target | None:
        return next((t for t in self.targets if t.connector == connector), None)

    def connectors(self) -> tuple[str, ...]:
        return tuple(t.connector for t in self.targets)


def _hub_url(value: object, at: _At) -> str:
    try:
        url = urlsplit(_str(value, at))
        url.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        raise at("not a valid URL (check the host and port)") from None
    if url.scheme not in ("ws", "wss") or not url.hostname:
        raise at("must be a ws:// or wss:// URL with a host")
    if url.username is not None or url.fragment:
        raise at("must not contain credentials or a #fragment")
    return urlunsplit(url._replace(path=url.path or "/tunnel"))


def _target(name: object, text: object, at: _At) -> Target:
    if not isinstance(name, str) or not re.fullmatch(_CONNECTOR_RE, name):
        raise at(f"connector name must match {_CONNECTOR_RE}")
    try:
        return Target(name, *parse_target(_str(text, at)))
    except ValueError as e:
        raise at(str(e)) from None


def _target_map(value: object, at: _At) -> tuple[Target, ...]:
    if not isinstance(value, dict):
        raise at(f"expected a mapping of connector: host:port, got {_kind(value)}")
    if not value:
        raise at("must name at least one connector")
    return tuple(_target(k, v, at.child(str(k))) for k, v in value.items())


def _target_env(value: object, at: _At) -> tuple[Target, ...]:
    entries = [e.strip() for e in _str(value, at).split(",") if e.strip()]
    if not entries:
        raise at("must name at least one connector")
    targets = []
    for i, entry in enumerate(entries, 1):
        name, eq, text = entry.partition("=")
        if not eq:
            raise at(f"entry {i}: expected name=host:port")
        try:
            targets.append(_target(name.strip(), text.strip(), at))
        except ConfigError as e:
            raise at(f"entry {i}: {e.reason}") from None
    if len({t.connector for t in targets}) != len(targets):
        raise at("names a connector twice")
    return tuple(targets)


def _read_token(path: str, at: _At) -> tuple[str, list[str]]:
    try:
        with open(path, "rb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            raw = f.read()
    except OSError as e:
        raise at(f"cannot read file: {e.strerror}") from None
    try:
        token = raw.decode("utf-8").rstrip()
    except UnicodeDecodeError:
        raise at("file is not UTF-8 text") from None
    if not token:
        raise at("file is empty")
    wide = [f"{path}: token_file: mode {mode:04o} is wider than 0600"] if mode & 0o077 else []
    return token, wide


def parse_agent_config(data: object, source: str = "<string>",
                       environ: Mapping[str, str] = {}) -> AgentConfig:
    """
    Validate parsed YAML C{data}, overlaid by C{environ} (C{NC_HUB_URL}, C{NC_AGENT_ID},
    C{NC_AGENT_TOKEN}, C{NC_AGENT_TOKEN_FILE}, C{NC_CONNECTORS}), into an L{AgentConfig}.

    The environment wins over the file. Token precedence: C{NC_AGENT_TOKEN}, then
    C{NC_AGENT_TOKEN_FILE}, then the file's C{token} or C{token_file} (both set is an error);
    a token file that is not used is not read.
    """
    secrets = [environ.get("NC_AGENT_TOKEN", "")]
    if isinstance(data, dict) and isinstance(data.get("token"), str):
        secrets.append(data["token"])
    try:
        return _parse_agent(data, source, environ, secrets)
    except ConfigError as e:
        key, reason = e.key, e.reason
        for secret in (s for s in secrets if len(s) >= 4):  # shorter would garble, not hide
            key, reason = key.replace(secret, "***"), reason.replace(secret, "***")
        raise ConfigError(e.source, key, reason) from None


def _parse_agent(data: object, source: str, environ: Mapping[str, str],
                 secrets: list[str]) -> AgentConfig:
    if data is None:
        raise ConfigError(source, "(top level)", "empty configuration")
    s = _Section(data, _At(source, ""), (
        "agent_id", "ca_file", "client_cert", "client_key", "connect_timeout", "connectors",
        "drain_seconds", "handshake_timeout", "hub_url", "metrics_listen", "ping_interval",
        "ping_timeout", "reconnect_initial_delay", "reconnect_max_delay", "token", "token_file"))

    def layered(name: str, var: str, conv: _Conv[_T],
                env_conv: _Conv[_T] | None = None) -> _T | None:
        from_file = s.get(name, conv, None)
        if environ.get(var):
            return (env_conv or conv)(environ[var], _At("environment", var))
        return from_file

    def required(value: _T | None, name: str, var: str) -> _T:
        if value is None:
            raise s.at.child(name)(f"required (or set {var})")
        return value

    hub_url = required(layered("hub_url", "NC_HUB_URL", _hub_url), "hub_url", "NC_HUB_URL")
    agent_id = required(layered("agent_id", "NC_AGENT_ID", _matching(_AGENT_ID_RE)),
                        "agent_id", "NC_AGENT_ID")
    targets = required(layered("connectors", "NC_CONNECTORS", _target_map, _target_env),
                       "connectors", "NC_CONNECTORS")
    token = s.get("token", _str, None)
    token_file = s.get("token_file", _str, None)
    if token is not None and token_file is not None:
        raise s.at.child("token_file")("set only one of token and token_file")
    warnings: list[str] = []
    if environ.get("NC_AGENT_TOKEN"):
        token = environ["NC_AGENT_TOKEN"]
    elif environ.get("NC_AGENT_TOKEN_FILE"):
        token, warnings = _read_token(environ["NC_AGENT_TOKEN_FILE"],
                                      _At("environment", "NC_AGENT_TOKEN_FILE"))
    elif token_file is not None:
        token, warnings = _read_token(token_file, s.at.child("token_file"))
    elif token is None:
        raise s.at.child("token")("required: set token or token_file (or NC_AGENT_TOKEN)")
    secrets.append(token)
    initial = s.get("reconnect_initial_delay", _float(0, allow_lo=False), 1.0)
    cfg = AgentConfig(
        source, hub_url, agent_id, token, targets,
        connect_timeout=s.get("connect_timeout", _float(0, allow_lo=False), 10.0),
        reconnect_initial_delay=initial,
        reconnect_max_delay=s.get("reconnect_max_delay", _float(initial, allow_lo=True), 60.0),
        metrics_listen=s.get("metrics_listen", _str, None),
        ca_file=s.get("ca_file", _readable, None),
        client_cert=s.get("client_cert", _readable, None),
        client_key=s.get("client_key", _readable, None),
        drain_seconds=s.get("drain_seconds", _float(0, allow_lo=True), 10.0),
        handshake_timeout=s.get("handshake_timeout", _float(0, allow_lo=False), 10.0),
        ping_interval=s.get("ping_interval", _float(0, allow_lo=False), 15.0),
        ping_timeout=s.get("ping_timeout", _float(0, allow_lo=False), 45.0),
    )
    if (cfg.client_cert is None) != (cfg.client_key is None):
        raise s.at.child("client_key" if cfg.client_key is None else "client_cert")(
            "client_cert and client_key must be set together")
    if hub_url.startswith("ws:") and (cfg.ca_file or cfg.client_cert):
        warnings.append(
            f"{source}: ca_file/client_cert: TLS settings have no effect with a ws:// hub_url")
    return attrs.evolve(cfg, warnings=tuple(warnings))


def _load(path: str) -> object:
    try:
        with open(path, "rb") as f:
            return yaml.load(f, Loader=_Loader)
    except OSError as e:
        raise ConfigError(path, "(file)", f"cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or type(e).__name__
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(path, "(yaml)", f"invalid YAML: {where}{problem}") from None


def load_hub_config(path: str) -> HubConfig:
    """Read and validate the hub YAML file at C{path}."""
    return parse_hub_config(_load(path), path)


def load_agent_config(path: str | None, environ: Mapping[str, str]) -> AgentConfig:
    """Read and validate the agent YAML at C{path} overlaid by C{environ}; C{None}: env only."""
    if path is None:
        return parse_agent_config({}, "environment", environ)
    return parse_agent_config(_load(path), path, environ)


class _Loader(yaml.SafeLoader):
    """C{SafeLoader} that rejects a repeated mapping key instead of keeping the last one."""


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> Iterator[dict[Any, Any]]:
    seen: list[object] = []
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.append(key)
    return loader.construct_yaml_map(node)


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
