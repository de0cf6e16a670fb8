"""
What the hub's and the agent's twistd plugins share: a C{--config} option loaded and validated
in C{postOptions} (a bad file is a one-line usage error before anything binds), C{--check},
and building the service with a clean SIGTERM under twistd.
"""
# -*- test-case-name: tests.test_assembly -*-

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import IService
from twisted.python import usage

from nowconnect.config import ConfigError


class ConfigOptions(usage.Options):
    """C{--config PATH} and C{--check}; subclasses say how to load the file."""

    optFlags = [["check", None, "Validate the configuration and exit."]]

    loaded: Any

    def load(self, path: str | None) -> Any:
        raise NotImplementedError

    def postOptions(self) -> None:
        try:
            self.loaded = self.load(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["check"]:
            print(f"{self['config'] or 'environment'}: OK")
            raise SystemExit(0)


def build_service(
    options: ConfigOptions,
    reactor: Any,
    make: Callable[[Any, Any], IService],
    endpoint_key: str,
) -> IService:
    """
    C{make(config, reactor)}; C{reactor=None} (twistd) means the global reactor with SIGTERM
    draining to exit 0.  A bad endpoint string under C{endpoint_key} is a usage error.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        from nowconnect.shutdown import stop_cleanly_on_sigterm

        reactor = global_reactor
        stop_cleanly_on_sigterm(reactor)
    try:
        return make(options.loaded, reactor)
    except ValueError as e:
        source = options["config"] or "environment"
        raise usage.UsageError(f"{source}: {endpoint_key}: {e}") from None
