"""Shared pytest fixtures: private OpenLDAP servers (logic lives in tests/slapd.py).

Warnings: ldap3 2.9.1 with pyasn1 0.6.x emits DeprecationWarnings (tagMap/typeMap) on
import, and ldap3's TLS hostname check calls the deprecated ssl.match_hostname. setup.cfg
([tool:pytest] filterwarnings) already ignores DeprecationWarning from ldap3.* and pyasn1.*,
so `-W error` runs stay green; keep those filters if the pytest config moves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from slapd import BULK_ENTRIES, Slapd, bulk_ldif, require_slapd


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """One shared slapd for the session: LDAP + StartTLS on ``.url``, LDAPS on ``.ldaps_url``
    (CA in ``.ca_file``), seed data plus BULK_ENTRIES entries under ou=bulk (loaded offline).

    Treat it as read-only; tests that write should use ``slapd_factory``.
    Setup takes ~0.14 s on a 2-core VM (per-step seconds in ``.timings``).
    """
    require_slapd()
    server = Slapd(
        tmp_path_factory.mktemp("slapd"), tls=True, extra_ldif=[bulk_ldif(BULK_ENTRIES)]
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def slapd_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Slapd]]:
    """Start fresh servers: ``slapd_factory(tls=..., extra_ldif=..., seed=..., log_level=...)``
    returns a started :class:`Slapd` (~70 ms each); all are stopped at teardown."""
    require_slapd()
    servers: list[Slapd] = []

    def start(**options: Any) -> Slapd:
        server = Slapd(tmp_path_factory.mktemp("slapd"), **options)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
