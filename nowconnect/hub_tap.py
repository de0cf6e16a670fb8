"""``twistd nowconnect-hub --config FILE``: options and assembly only."""
# -*- test-case-name: tests.test_assembly -*-

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from nowconnect.config import HubConfig, load_hub_config
from nowconnect.tap import ConfigOptions, build_service


class Options(ConfigOptions):
    optParameters = [["config", "c", "/etc/nowconnect/hub.yaml", "Hub configuration (YAML)."]]

    def load(self, path: str | None) -> HubConfig:
        return load_hub_config(path or "")


def makeService(options: Options, reactor: Any = None) -> IService:
    from nowconnect.hub import make_hub_service

    return build_service(options, reactor, make_hub_service, "listen")
