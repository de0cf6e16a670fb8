"""``twistd nowconnect-hub --config FILE``: options and assembly only."""
# -*- test-case-name: tests.test_taps -*-

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from nowconnect.config import ConfigError, HubConfig, load_hub_config


class Options(usage.Options):
    optParameters = [["config", "c", "/etc/nowconnect/hub.yaml", "Hub configuration (YAML)."]]
    optFlags = [["check", None, "Validate the configuration and exit."]]

    hub_config: HubConfig

    def postOptions(self) -> None:
        try:
            self.hub_config = load_hub_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["check"]:
            print(f"{self['config']}: OK")
            raise SystemExit(0)


def makeService(options: Options, reactor: Any = None) -> IService:
    from nowconnect.hub import make_hub_service

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        from nowconnect.shutdown import stop_cleanly_on_sigterm

        reactor = global_reactor
        stop_cleanly_on_sigterm(reactor)
    try:
        return make_hub_service(options.hub_config, reactor)
    except ValueError as e:  # a bad endpoint string in `listen`
        raise usage.UsageError(f"{options['config']}: listen: {e}") from None
