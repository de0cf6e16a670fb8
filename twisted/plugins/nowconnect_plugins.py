"""twistd plugins: ``twistd nowconnect-hub`` and ``twistd nowconnect-agent``."""

from twisted.application.service import ServiceMaker

nowconnect_hub = ServiceMaker(
    "NowConnect hub",
    "nowconnect.hub_tap",
    "Cloud side of the NowConnect tunnel: connector listeners, /tunnel, /healthz, /metrics.",
    "nowconnect-hub",
)
nowconnect_agent = ServiceMaker(
    "NowConnect agent",
    "nowconnect.agent_tap",
    "On-premises side of the NowConnect tunnel: dials the hub, connects streams to targets.",
    "nowconnect-agent",
)
