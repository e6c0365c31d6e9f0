"""A service address's route flipped to another veth of this host in one netlink request, on the event loop.

A live handover on one host (agent/api/stagestate.py) moves the chain's address from the serving
stage's veth to the next stage's while the serving stage refuses changes, so everything that can be
done before is: the netlink socket opened, the veth's index looked up and the veth set up. What is
left for the moment of the switch is one `route replace`, sent from the event loop (pyroute2's
asyncio API), with no worker thread to wake on a busy host. `ServiceNetwork.route_switch` holds
one open; `ServiceNetwork.publish` afterwards does the rest of a publish (the proxy ARP entry, the
announcement), none of which a client on this host waits for.
"""

from __future__ import annotations

import errno

from pyroute2 import AsyncIPRoute

from agent.network.netlink import RT_SCOPE_LINK, RT_TABLE_MAIN, RTPROT_FERRYMAN


class RouteSwitch:
    """`switch = await RouteSwitch.open(ip, veth)`, later `await switch.flip()`, then `switch.close()`.
    OSError or NetlinkError from `open` when the veth is not there, from `flip` when the kernel
    refuses."""

    def __init__(self, ipr: AsyncIPRoute, service_ip: str, index: int) -> None:
        self._ipr, self._service_ip, self._index = ipr, service_ip, index

    @classmethod
    async def open(cls, service_ip: str, host_veth: str) -> RouteSwitch:
        ipr = AsyncIPRoute()
        try:
            await ipr.setup_endpoint()
            found = await ipr.link_lookup(ifname=host_veth)
            if not found:
                raise OSError(errno.ENODEV, f"no interface {host_veth}: prepare the container's network first")
            index = int(found[0])
            await ipr.link("set", index=index, state="up")
        except BaseException:
            ipr.close()
            raise
        return cls(ipr, service_ip, index)

    async def flip(self) -> None:
        """Route the address to the veth (replacing the route to any other)."""
        await self._ipr.route(
            "replace",
            dst=f"{self._service_ip}/32",
            oif=self._index,
            scope=RT_SCOPE_LINK,
            proto=RTPROT_FERRYMAN,
            table=RT_TABLE_MAIN,
        )

    def close(self) -> None:
        self._ipr.close()
