"""Traffic follows the container: per-container network namespaces with a routed service address.

The adapter (`ServiceNetwork`) is the only place that talks netlink; pyroute2 is imported nowhere
else in the agent. See agent/network/service.py for the design.
"""

from agent.network.addresses import parse_service_ip
from agent.network.netlink import HELD, RTPROT_FERRYMAN
from agent.network.service import NetnsInfo, NetworkError, ServiceNetwork, UplinkNotFound

__all__ = [
    "HELD",
    "RTPROT_FERRYMAN",
    "NetnsInfo",
    "NetworkError",
    "ServiceNetwork",
    "UplinkNotFound",
    "parse_service_ip",
]
