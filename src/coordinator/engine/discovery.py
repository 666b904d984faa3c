"""Workers found on the local network instead of listed in the cluster file.

The coordinator browses for workers' DNS-SD records (contract/discovery.py) and asks each
one found for its Info, with the cluster token: a worker that refuses the token (or needs
one this coordinator lacks) is logged and not used, so discovery never bypasses
authentication. `Discovery.find` waits for `discovery.expected_workers` usable workers, or
`discovery.timeout_s`, and gives the spec with them as `workers`, in name order: stable
across restarts, so each keeps its slice, and the weights sent for it. Browsing goes on;
`watch` hands a worker that appears later to its callback (which makes it a standby).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable

import psutil
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mlx_cluster.contract.config import ClusterConfig, WorkerEntry
from mlx_cluster.contract.discovery import SERVICE_TYPE, Advert
from mlx_cluster.contract.errors import ClusterError, Unauthenticated
from mlx_cluster.coordinator.engine.client import WorkerClient

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000  # for a found record's address and properties
PROBE_TIMEOUT_S = 5.0  # for a found worker's Info, asked with the cluster token


class Browser:
    """Resolved worker records from multicast DNS, on `adverts` as they are found."""

    def __init__(self) -> None:
        self.adverts: asyncio.Queue[Advert] = asyncio.Queue()
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._resolving: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._zeroconf = AsyncZeroconf(ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(
            self._zeroconf.zeroconf, [SERVICE_TYPE], handlers=[self._changed]
        )

    def _changed(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Added:  # also when a worker comes back
            task = asyncio.ensure_future(self._resolve(zeroconf, name))
            self._resolving.add(task)
            task.add_done_callback(self._resolving.discard)

    async def _resolve(self, zeroconf: Zeroconf, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS) or not info.port:
            log.info("found %s but could not resolve its address", name)
            return
        host = pick_address(info.parsed_addresses(IPVersion.V4Only))
        if host is not None:
            self.adverts.put_nowait(Advert.from_record(f"{host}:{info.port}", info.properties))

    async def close(self) -> None:
        for task in list(self._resolving):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zeroconf is not None:
            await self._zeroconf.async_close()


def pick_address(addresses: list[str]) -> str | None:
    """Of a worker's addresses, one on a network this host is on (else the first)."""
    networks = [
        ipaddress.ip_network(f"{a.address}/{a.netmask}", strict=False)
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and a.netmask
    ]
    for address in addresses:
        if any(ipaddress.ip_address(address) in network for network in networks):
            return address
    return addresses[0] if addresses else None


class Discovery:
    """Finds workers for `config`; `connect` makes a client with the cluster's credentials."""

    def __init__(
        self,
        config: ClusterConfig,
        connect: Callable[[WorkerEntry], WorkerClient],
        browser: Browser | None = None,
    ) -> None:
        self.config = config
        self._connect = connect
        self._browser = browser or Browser()
        # Addresses of the workers in use (stages and standbys): not asked again. A worker
        # not used is asked again when its record reappears (it restarted).
        self._used: set[str] = {entry.address for entry in config.standby}
        self._discovered = 0  # records found
        self._watcher: asyncio.Task[None] | None = None

    async def find(self) -> ClusterConfig:
        """The spec with the workers found as `workers` (beyond the expected number: as
        standbys), once the expected number answer or the timeout passes.

        Raises:
            ClusterError: no usable worker was found in time.
        """
        settings = self.config.discovery
        if self.config.workers:
            log.warning(
                "discovering workers: the %d listed in `workers` are not used",
                len(self.config.workers),
            )
        await self._browser.start()
        deadline = time.monotonic() + settings.timeout_s
        found: list[Advert] = []
        log.info(
            "looking for %s workers on the local network (%s), up to %g s",
            settings.expected_workers or "all",
            SERVICE_TYPE,
            settings.timeout_s,
        )
        while settings.expected_workers is None or len(found) < settings.expected_workers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                advert = await asyncio.wait_for(self._browser.adverts.get(), remaining)
                if await self._usable(advert):
                    found.append(advert)
        if not found:
            raise ClusterError(
                f"no usable worker found on the local network within {settings.timeout_s:g} s "
                f"({self._discovered} discovered): start `mlx-cluster worker` on each host "
                "(listening beyond loopback), or list workers in the cluster file"
            )
        if settings.expected_workers and len(found) < settings.expected_workers:
            log.warning(
                "found %d of the %d workers expected within %g s: starting with those",
                len(found),
                settings.expected_workers,
                settings.timeout_s,
            )
        found.sort(key=lambda a: (a.name, a.address))
        count = settings.expected_workers or len(found)
        entries = _entries(found)
        log.info("workers found: %s", ", ".join(f"{e.name} at {e.address}" for e in entries))
        update = {"workers": entries[:count], "standby": [*self.config.standby, *entries[count:]]}
        return self.config.model_copy(update=update)

    async def _usable(self, advert: Advert) -> bool:
        """Whether a found worker answers this coordinator (a clear log line if not)."""
        if advert.address in self._used:
            return False
        self._discovered += 1
        why_not = None
        if advert.token_required and not _has_token(self.config):
            why_not = (
                "it requires a cluster token and this coordinator has none "
                "(auth.token or auth.token_file)"
            )
        else:
            client = self._connect(WorkerEntry(address=advert.address, name=advert.name))
            try:
                await client.info(timeout=PROBE_TIMEOUT_S)
            except Unauthenticated as exc:
                why_not = f"it refused this coordinator's cluster token ({exc})"
            except ClusterError as exc:
                why_not = str(exc)
            finally:
                await client.close()
        if why_not is not None:
            log.warning(
                "worker %s at %s was discovered but is not used: %s",
                advert.name,
                advert.address,
                why_not,
            )
            return False
        self._used.add(advert.address)
        log.info("discovered worker %s at %s (%s)", advert.name, advert.address, advert.device)
        return True

    def watch(self, on_found: Callable[[WorkerEntry], Awaitable[None]]) -> None:
        """From now on, hand each usable worker found to `on_found`."""

        async def keep_watching() -> None:
            while True:
                advert = await self._browser.adverts.get()
                if await self._usable(advert):
                    await on_found(*_entries([advert]))

        self._watcher = asyncio.create_task(keep_watching(), name="discovery")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._browser.close()


def _has_token(config: ClusterConfig) -> bool:
    return bool(config.auth.token or config.auth.token_file)


def _entries(adverts: list[Advert]) -> list[WorkerEntry]:
    """Worker entries named as the workers call themselves, or by address where two share one."""
    names = [a.name for a in adverts]
    return [
        WorkerEntry(address=a.address, name=a.name if names.count(a.name) == 1 else None)
        for a in adverts
    ]
