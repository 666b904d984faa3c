"""Discovery's choices, with found records fed by hand to real workers on port 0: who is
used, who becomes a standby, and who is named in a log line and left alone."""

from __future__ import annotations

import asyncio
import logging

import pytest

from mlx_cluster.contract.config import ClusterConfig, WorkerEntry
from mlx_cluster.contract.discovery import Advert
from mlx_cluster.contract.errors import ClusterError
from mlx_cluster.coordinator.engine.discovery import Browser, Discovery
from mlx_cluster.coordinator.engine.startup import worker_client
from mlx_cluster.worker import advertise
from mlx_cluster.worker.advertise import advertisable
from mlx_cluster.worker.runtime import WorkerSettings
from mlx_cluster.worker.server import create_server


class Fed(Browser):
    """A browser whose records come from the test."""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


def advert(name: str, address: str, token_required: bool = True) -> Advert:
    return Advert(name, address, "0", 7, token_required, False, "cpu", 1.0)


def spec(token: str | None = "right", **discovery: object) -> ClusterConfig:
    return ClusterConfig.model_validate(
        {"model": "m", "workers": "auto", "discovery": discovery, "auth": {"token": token}}
    )


def test_an_advert_survives_its_record() -> None:
    sent = advert("mini", "10.0.0.2:50051")
    raw = {k.encode(): v.encode() for k, v in sent.properties().items()}
    assert Advert.from_record("10.0.0.2:50051", raw) == sent
    assert advertisable("10.0.0.2:50051") and advertisable("0.0.0.0:50051")
    assert not advertisable("127.0.0.1:50051") and not advertisable("unix:/tmp/w.sock")


async def test_only_workers_taking_the_token_are_used(caplog: pytest.LogCaptureFixture) -> None:
    workers = [
        await create_server("127.0.0.1:0", WorkerSettings(name=n), token=t)
        for n, t in (("b", "right"), ("a", "right"), ("c", "right"), ("x", "other"))
    ]
    config = spec(expected_workers=2, timeout_s=5)
    browser = Fed()
    discovery = Discovery(config, lambda entry: worker_client(entry, config), browser)
    for worker in (workers[3], workers[0], workers[1]):
        browser.adverts.put_nowait(advert(worker.servicer.runtime.settings.name, worker.address))
    browser.adverts.put_nowait(advert("y", "127.0.0.1:1", token_required=True))
    try:
        with caplog.at_level(logging.INFO):
            found = await discovery.find()
            assert [(w.name, w.address) for w in found.workers] == [
                ("a", workers[1].address),  # in name order
                ("b", workers[0].address),
            ]
            later: asyncio.Queue[WorkerEntry] = asyncio.Queue()
            discovery.watch(later.put)
            browser.adverts.put_nowait(advert("c", workers[2].address))
            assert (await asyncio.wait_for(later.get(), 5)).name == "c"
        assert (
            f"worker x at {workers[3].address} was discovered but is not used: it refused this "
            "coordinator's cluster token"
        ) in caplog.text
    finally:
        await discovery.close()
        for worker in workers:
            await worker.stop(grace=None)


async def test_no_usable_worker_is_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    config = spec(token=None, timeout_s=0.5)
    browser = Fed()
    browser.adverts.put_nowait(advert("locked", "127.0.0.1:1", token_required=True))
    discovery = Discovery(config, lambda entry: worker_client(entry, config), browser)
    with pytest.raises(ClusterError, match="no usable worker found on the local network"):
        await discovery.find()
    assert "it requires a cluster token and this coordinator has none" in caplog.text


async def test_a_worker_that_cannot_advertise_still_serves(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(advertise.psutil, "net_if_addrs", dict)  # loopback only, say
    advertiser = advertise.Advertiser(advert("lonely", "0.0.0.0:50051"))
    await advertiser.start()
    await advertiser.close()
    assert "not advertised: this host has no IPv4 address beyond loopback" in caplog.text
