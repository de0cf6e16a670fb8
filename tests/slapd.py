"""Throwaway OpenLDAP servers (slapd) for tests.

One :class:`Slapd` is one private server in its own directory:

* ``tests/ldap/config.ldif.in`` is rendered to ``<dir>/config.ldif`` and loaded with
  ``slapadd -n0`` (cn=config), then ``tests/ldap/seed.ldif`` plus any ``extra_ldif``
  (e.g. :func:`bulk_ldif`) is loaded offline with one ``slapadd -n1`` (the mdb database);
* with ``tls=True`` a test CA and a server certificate for ``localhost``/``127.0.0.1``
  are made with :mod:`pki`, so the server speaks StartTLS on ``url`` and LDAPS on
  ``ldaps_url``;
* ``/usr/sbin/slapd -d none`` runs in the foreground as our child (``-d none`` keeps it in
  the foreground and still prints errors, see ``<dir>/slapd.log``), listening on
  127.0.0.1 only, on free high ports.

Start-up (config + seed + start + first answer) takes ~70 ms (~0.14 s with TLS and 6,000
bulk entries; 2-core VM), so a fresh server per test is affordable. Usage::

    with Slapd(tmp_path, tls=True, extra_ldif=[bulk_ldif(100)]) as srv:
        Connection(Server(srv.url), srv.admin_dn, srv.admin_password, auto_bind=True)

This module does not import ldap3 (so importing it from conftest.py emits none of
ldap3/pyasn1's import-time DeprecationWarnings); it only needs the Debian packages::

    apt-get install -y --no-install-recommends slapd ldap-utils
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import pytest

try:  # tests/ as a package (e.g. --import-mode=importlib with __init__.py) ...
    from . import pki
except ImportError:  # ... or, pytest's default, tests/ on sys.path (rootdir conftest)
    import pki

__all__ = [
    "BASE_DN",
    "BULK_ENTRIES",
    "ADMIN_DN",
    "ADMIN_PASSWORD",
    "SBIN",
    "SLAPD_MISSING_HINT",
    "Slapd",
    "SlapdError",
    "bulk_ldif",
    "require_slapd",
]

LDAP_DIR = Path(__file__).resolve().parent / "ldap"
CONFIG_TEMPLATE = LDAP_DIR / "config.ldif.in"
SEED_LDIF = LDAP_DIR / "seed.ldif"

#: Where Debian puts slapd/slapadd. Tests monkeypatch this to simulate a missing install.
SBIN = Path("/usr/sbin")

BASE_DN = "dc=example,dc=org"
ADMIN_DN = f"cn=admin,{BASE_DN}"
ADMIN_PASSWORD = "admin"
#: Entries under ou=bulk in the session-scoped ``slapd`` fixture (conftest.py).
BULK_ENTRIES = 6000
HOST = "127.0.0.1"

SLAPD_MISSING_HINT = (
    "OpenLDAP slapd is not installed ({missing} missing). Install it (Debian/Ubuntu, root) with:\n"
    "  echo 'slapd slapd/no_configuration boolean true' | debconf-set-selections\n"
    "  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slapd ldap-utils\n"
    "(the preseed keeps the package from creating a default database and a daemon on :389)."
)

#: How long start() waits for slapd to answer, and how often it retries a port clash.
START_TIMEOUT = 10.0
PORT_ATTEMPTS = 5
STOP_TIMEOUT = 10.0


class SlapdError(RuntimeError):
    """slapd or slapadd failed; the message includes the relevant log output."""


def require_slapd() -> None:
    """Fail (under ``CI=true``) or skip (elsewhere) when slapd/slapadd are not installed.

    In CI a missing slapd is a broken pipeline, not a reason to silently skip the LDAP tests.
    """
    missing = [str(SBIN / b) for b in ("slapd", "slapadd") if not (SBIN / b).is_file()]
    if missing:
        msg = SLAPD_MISSING_HINT.format(missing=", ".join(missing))
        if os.environ.get("CI") == "true":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def bulk_ldif(n: int, ou: str = "bulk", base_dn: str = BASE_DN) -> str:
    """LDIF for ``ou=<ou>,<base_dn>`` and ``n`` inetOrgPerson entries below it.

    Entries are ``uid=user00001`` ... ``uid=user<n>`` (zero-padded to 5 digits, wider if
    needed), each with cn, sn, givenName, mail and employeeNumber (= the number).
    """
    width = max(5, len(str(n)))
    parts = [f"dn: ou={ou},{base_dn}\nobjectClass: organizationalUnit\nou: {ou}\n"]
    for i in range(1, n + 1):
        uid = f"user{i:0{width}d}"
        parts.append(
            f"dn: uid={uid},ou={ou},{base_dn}\n"
            "objectClass: inetOrgPerson\n"
            f"uid: {uid}\n"
            f"cn: Bulk User {i}\n"
            f"sn: User{i}\n"
            "givenName: Bulk\n"
            f"mail: {uid}@example.org\n"
            f"employeeNumber: {i}\n"
        )
    return "\n".join(parts)


def render_config(directory: Path, tls: pki.LeafFiles | None = None) -> str:
    """Render config.ldif.in for ``directory``; with ``tls``, enable the ``#TLS`` lines."""
    text = CONFIG_TEMPLATE.read_text().replace("@DIR@", str(directory))
    if tls is not None:
        text = (
            text.replace("#TLS ", "")
            .replace("@TLS_CA@", str(tls.ca_cert))
            .replace("@TLS_CERT@", str(tls.cert))
            .replace("@TLS_KEY@", str(tls.key))
        )
    return text


def _free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (racy: see Slapd.start, which retries)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Slapd:
    """A private slapd for ``dc=example,dc=org`` in ``directory`` (absolute, will be created).

    :param tls: ``False`` for plain LDAP only; ``True`` to make a CA and server certificate
        (in ``<directory>/pki``) and serve LDAPS as well as StartTLS; or a :class:`pki.CA`
        to issue the server certificate from an existing CA.
    :param extra_ldif: LDIF texts or files loaded offline after ``seed.ldif``
        (e.g. ``[bulk_ldif(6000)]``).
    :param seed: load ``tests/ldap/seed.ldif`` (people alice/bob/carol, group staff).
    :param log_level: slapd ``-d`` level; ``"none"`` prints only errors and start/stop
        lines, ``"stats"`` logs each operation (to ``<directory>/slapd.log``).

    The constructor only prepares; :meth:`start` builds and starts (once), :meth:`stop`
    stops. Also a context manager. ``timings`` holds seconds per setup step.
    """

    def __init__(
        self,
        directory: Path,
        *,
        tls: bool | pki.CA = False,
        extra_ldif: Iterable[str | Path] = (),
        seed: bool = True,
        log_level: str = "none",
    ) -> None:
        self.directory = Path(directory).absolute()
        self.tls = tls
        self.extra_ldif = list(extra_ldif)
        self.seed = seed
        self.log_level = log_level
        self.ca: pki.CA | None = None
        self.server_cert: pki.LeafFiles | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.timings: dict[str, float] = {}
        self._port: int | None = None
        self._ldaps_port: int | None = None
        self._built = False
        self._log: IO[bytes] | None = None

    # --- connection details ---------------------------------------------------------------

    base_dn = BASE_DN
    admin_dn = ADMIN_DN
    admin_password = ADMIN_PASSWORD
    host = HOST

    @property
    def port(self) -> int:
        """Plain LDAP (and StartTLS, with TLS) port on 127.0.0.1."""
        if self._port is None:
            raise SlapdError("slapd is not started")
        return self._port

    @property
    def url(self) -> str:
        """``ldap://127.0.0.1:PORT`` (no trailing slash: ldap3's Server rejects one)."""
        return f"ldap://{HOST}:{self.port}"

    @property
    def ldaps_port(self) -> int | None:
        """LDAPS port, or None without TLS."""
        return self._ldaps_port

    @property
    def ldaps_url(self) -> str | None:
        return None if self._ldaps_port is None else f"ldaps://{HOST}:{self._ldaps_port}"

    @property
    def ca_file(self) -> Path | None:
        """PEM of the CA that signed the server certificate, or None without TLS."""
        return None if self.ca is None else self.ca.cert

    @property
    def log_path(self) -> Path:
        return self.directory / "slapd.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> Slapd:
        """Build the instance (first call only) and start slapd; returns self.

        Waits at most START_TIMEOUT s per attempt until slapd has logged ``slapd starting``
        and accepts TCP on every port. If a port was taken between choosing and binding it
        (``Address already in use``), retries with new ports, PORT_ATTEMPTS times.
        """
        require_slapd()
        if self.running:
            return self
        t0 = time.perf_counter()
        if not self._built:
            self._build()
        for _attempt in range(PORT_ATTEMPTS):
            t_start = time.perf_counter()
            port = _free_port()
            ldaps_port = _free_port() if self.server_cert is not None else None
            if self._launch(port, ldaps_port):
                self._port, self._ldaps_port = port, ldaps_port
                self.timings["start"] = time.perf_counter() - t_start
                self.timings["total"] = time.perf_counter() - t0
                return self
        raise SlapdError(f"slapd: address in use {PORT_ATTEMPTS} times\n{self._log_text()}")

    def stop(self) -> int | None:
        """SIGTERM slapd and wait (SIGKILL after STOP_TIMEOUT s); returns its exit code.

        Idempotent. A clean shutdown exits 0 and removes ``<directory>/slapd.pid``.
        """
        proc, self.process = self.process, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> Slapd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"url={self.url!r}" if self.running else "stopped"
        return f"<Slapd {self.directory} {state}>"

    # --- internals ------------------------------------------------------------------------

    def _build(self) -> None:
        d = self.directory
        (d / "slapd.d").mkdir(parents=True)  # slapadd -n0 needs it empty
        (d / "data").mkdir()  # slapd does not create the MDB directory

        t = time.perf_counter()
        if self.tls:
            self.ca = self.tls if isinstance(self.tls, pki.CA) else pki.make_ca(d / "pki")
            # libldap (ldap-utils) checks "localhost" against the machine's host name, so
            # add that too: `ldapwhoami -ZZ -H ldap://localhost:PORT/` then verifies.
            # (Not socket.getfqdn(): a reverse DNS lookup can stall on a broken resolver.)
            names = dict.fromkeys(["localhost", socket.gethostname()])
            self.server_cert = self.ca.issue("slapd", dns=[n for n in names if n], ips=[HOST])
            self.timings["pki"] = time.perf_counter() - t

        t = time.perf_counter()
        config = d / "config.ldif"
        config.write_text(render_config(d, self.server_cert))
        self._slapadd("-n0", config)
        self.timings["slapadd_config"] = time.perf_counter() - t

        t = time.perf_counter()
        chunks = [SEED_LDIF.read_text()] if self.seed else []
        for extra in self.extra_ldif:
            chunks.append(extra.read_text() if isinstance(extra, Path) else extra)
        if chunks:
            data = d / "data.ldif"
            data.write_text("\n\n".join(c.strip("\n") for c in chunks) + "\n")
            self._slapadd("-n1", data)
        self.timings["slapadd_data"] = time.perf_counter() - t
        self._built = True

    def _slapadd(self, db: str, ldif: Path) -> None:
        # -q: no consistency checks, much faster for bulk loads (fine for generated data).
        cmd = [str(SBIN / "slapadd"), "-q", db, "-F", str(self.directory / "slapd.d"),
               "-l", str(ldif)]
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if res.returncode != 0:
            output = res.stdout.decode(errors="replace")
            raise SlapdError(f"{' '.join(cmd)} exited {res.returncode}:\n{output}")

    def _launch(self, port: int, ldaps_port: int | None) -> bool:
        """Start slapd on the given ports; True once ready, False on a port clash."""
        urls = [f"ldap://{HOST}:{port}/"]
        if ldaps_port is not None:
            urls.append(f"ldaps://{HOST}:{ldaps_port}/")
        if self._log is not None:
            self._log.close()
        self._log = open(self.log_path, "wb")  # truncated per attempt
        cmd = [
            str(SBIN / "slapd"), "-d", self.log_level, "-h", " ".join(urls),
            "-F", str(self.directory / "slapd.d"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        ports = [p for p in (port, ldaps_port) if p is not None]
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:  # exited during start-up
                code, self.process = self.process.returncode, None
                log = self._log_text()
                if "Address already in use" in log:
                    return False
                raise SlapdError(f"slapd exited {code} during start-up:\n{log}")
            # "slapd starting" is logged only once every listener is bound; checking it (not
            # only TCP) avoids mistaking another process that holds our port for slapd.
            # (The TCP probe of the LDAPS port logs a harmless "TLS: can't accept".)
            if "slapd starting" in self._log_text() and all(map(_accepts, ports)):
                return True
            if time.monotonic() > deadline:
                self.stop()
                raise SlapdError(f"slapd not ready within {START_TIMEOUT} s:\n{self._log_text()}")
            time.sleep(0.01)

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
    except OSError:
        return False
    return True
