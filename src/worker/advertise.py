"""A worker's record on the local network: DNS-SD over multicast DNS (the zeroconf library),
so that a coordinator started with `--discover` finds it without a cluster file.

The record lives as long as the worker serves; it is withdrawn when the worker stops. A
worker listening on every interface (0.0.0.0) advertises each of its non-loopback IPv4
addresses; one listening on loopback or a Unix socket is not advertised (no other host
could reach it).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket

import psutil
import zeroconf
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from mlx_cluster.contract.auth import is_loopback
from mlx_cluster.contract.discovery import SERVICE_TYPE, Advert
from mlx_cluster.contract.rpc import is_unix_address

log = logging.getLogger(__name__)


def advertisable(address: str) -> bool:
    """Whether a worker bound to `address` can be reached from another host."""
    return not is_unix_address(address) and not is_loopback(address.rsplit(":", 1)[0].strip("[]"))


def host_addresses(host: str) -> list[str]:
    """The IPv4 addresses to advertise for a worker bound to `host`."""
    if host in ("", "0.0.0.0", "[::]", "::"):
        return sorted(
            a.address
            for addrs in psutil.net_if_addrs().values()
            for a in addrs
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback
        )
    return [socket.gethostbyname(host)]


class Advertiser:
    """The worker's record, registered on start and withdrawn on close."""

    def __init__(self, advert: Advert) -> None:
        self.advert = advert
        host, port = advert.address.rsplit(":", 1)
        addresses = host_addresses(host.strip("[]"))
        label = f"{advert.name}-{port}"
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in addresses],
            port=int(port),
            properties=advert.properties(),
            server=f"{label}.local.",
        )
        self._zeroconf: AsyncZeroconf | None = None

    async def start(self) -> None:
        """Put the record on the network; a host where that fails (no multicast, no
        address) still serves, with a warning: coordinators must list it."""
        if not self._info.parsed_addresses():
            log.warning("not advertised: this host has no IPv4 address beyond loopback")
            return
        try:
            self._zeroconf = AsyncZeroconf(ip_version=IPVersion.V4Only)
            await self._zeroconf.async_register_service(self._info, allow_name_change=True)
        except (OSError, zeroconf.Error) as exc:
            log.warning("not advertised on the local network (%s): list this worker", exc)
            await self.close()
            return
        log.info(
            "advertising %s on the local network (%s at %s)",
            self._info.name,
            SERVICE_TYPE,
            ", ".join(self._info.parsed_addresses()),
        )

    async def close(self) -> None:
        if self._zeroconf is not None:
            with contextlib.suppress(OSError, zeroconf.Error):  # withdrawn as far as it can be
                await self._zeroconf.async_unregister_service(self._info)
            await self._zeroconf.async_close()
            self._zeroconf = None
