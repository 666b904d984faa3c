"""Zero-config: workers on their own hosts, found by mDNS, sent only their layers' weights.

    mlxc-w1-TAG                  mlxc-coord-TAG                  mlxc-w2-TAG
    10.211.1.2 ---- veth ---- 10.211.1.1 | 10.211.2.1 ---- veth ---- 10.211.2.2
    w1 (token A)                coordinator (token A,             w2 (token A)
                                the only copy of the model)       w3 (token B), port 50052

Each worker starts with an empty model cache of its own (MLX_CLUSTER_HOME) and is told no
path: `coordinator --discover --expect 2` finds them by their multicast DNS records, plans,
and sends each the files of its slice. The answer must be the greedy text single-process
mlx-lm gives; w3, whose token differs, is found but not used (and accepts nothing).
Needs root and iproute2 (tests/test_multihost.py builds the namespaces); skipped otherwise.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load as mlx_load
from mlx_lm.generate import generate_step

from mlx_cluster.models.inspect import read_safetensors_header
from mlx_cluster.models.random_model import build_random_model
from mlx_cluster.models.slice_files import SLICE_FILE
from tests.test_multihost import (
    HTTP_LISTEN,
    PROBE_SOURCE,
    Hosts,
    Process,
    built,
    ready_address,
)

PROMPT, NEW_TOKENS = "hello", 8
TOKENS = {"w1": "token-a", "w2": "token-a", "w3": "token-b"}
WORKERS = {"w1": ("w1", "10.211.1.2:50051"), "w2": ("w2", "10.211.2.2:50051")}
WORKERS["w3"] = ("w2", "10.211.2.2:50052")  # on w2's host, with another token


class LanHosts(Hosts):
    """The same three hosts, on links without added delay."""

    def _add_delays(self) -> None:
        pass

    def start(self, host: str, args: list[str], **env: str) -> Process:
        environment = {**self.env(), **env}
        process = Process(self.ns(host), [sys.executable, *args], environment, self.workdir)
        self.processes.append(process)
        return process


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[LanHosts]:
    with built(LanHosts, tmp_path) as made:
        yield made


def mlx_lm_text(model: Path) -> str:
    """The greedy completion single-process mlx-lm gives, up to the end-of-sequence token."""
    lm, tokenizer = mlx_load(str(model))
    tokens = []
    for token, _ in generate_step(mx.array(tokenizer.encode(PROMPT)), lm, max_tokens=NEW_TOKENS):
        if token in tokenizer.eos_token_ids:
            break
        tokens.append(token)
    return tokenizer.decode(tokens)


def logged(process: Process, text: str, timeout: float = 30.0) -> str:
    """The first line of `process`'s output so far, or within `timeout`, holding `text`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := [line for line in process.output if text in line]:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no line with {text!r} within {timeout} s")


def layers_on_disk(home: Path) -> set[int]:
    """The layers of every safetensors file a worker's store holds."""
    found = set()
    for file in (home / "received").glob("*/*.safetensors"):
        assert file.name == SLICE_FILE
        names = read_safetensors_header(file)
        found |= {int(n.split("layers.")[1].split(".")[0]) for n in names if "layers." in n}
    return found


@pytest.mark.slow
def test_discovered_workers_get_their_weights_and_answer_as_mlx_lm(hosts: LanHosts) -> None:
    untied = {"tie_word_embeddings": False}  # the first stage gets no LM head
    model = build_random_model(
        hosts.workdir / "model", "llama", num_layers=4, config_overrides=untied
    )
    want = mlx_lm_text(model)
    assert want  # a comparison that says something
    workers = {}
    for name, (host, address) in WORKERS.items():
        args = ["-m", "mlx_cluster", "worker", "--listen", address, "--name", name]
        home = str(hosts.workdir / f"home-{name}")
        token = TOKENS[name]
        workers[name] = hosts.start(
            host, args, MLX_CLUSTER_HOME=home, MLX_CLUSTER_AUTH__TOKEN=token
        )
    assert [ready_address(w) for w in workers.values()] == [a for _, a in WORKERS.values()]
    coordinator = hosts.start(
        "coord",
        ["-m", "mlx_cluster", "coordinator", "--model", str(model), "--discover", "--expect",
         "2", "--listen", HTTP_LISTEN, "--set", "discovery.timeout_s=60",
         "--set", "weights.chunk_kb=64"],
        MLX_CLUSTER_AUTH__TOKEN=TOKENS["w1"],
        MLX_CLUSTER_HOME=str(hosts.workdir / "home-coord"),  # its digests.json
    )  # fmt: skip
    coordinator.wait_for(lambda line: "serving" in line and "on http" in line)
    # Found before the others or after the start (then as a would-be standby): either way
    # named, and not used.
    refused = logged(coordinator, "worker w3 at 10.211.2.2:50052 was discovered")
    assert "not used: it refused this coordinator's cluster token" in refused

    probe = hosts.run("coord", "-c", PROBE_SOURCE, f"http://{HTTP_LISTEN}", "1")
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout)
    assert result["generate"]["text"] == want
    (health,) = result["health"]
    assert [(w["name"], w["address"]) for w in health["workers"]] == [
        ("w1", WORKERS["w1"][1]),
        ("w2", WORKERS["w2"][1]),
    ]
    for worker in health["workers"]:  # each disk holds exactly its own layers
        start, end = worker["layers"]
        assert layers_on_disk(hosts.workdir / f"home-{worker['name']}") == set(range(start, end))
    transfers = {t["worker"]: t for t in health["weight_transfers"]}
    assert sorted(transfers) == ["w1", "w2"] and all(t["done"] for t in transfers.values())
    assert not (hosts.workdir / "home-w3" / "received").exists()
    assert any("refused /mlx_cluster.v1.LayerService/Info" in line for line in workers["w3"].output)

    # A worker that appears later is a standby: it takes over w1's layers, weights and all.
    late = ["-m", "mlx_cluster", "worker", "--listen", "10.211.1.2:50053", "--name", "w4"]
    hosts.start("w1", late, MLX_CLUSTER_HOME=str(hosts.workdir / "home-w4"),
                MLX_CLUSTER_AUTH__TOKEN=TOKENS["w1"])  # fmt: skip
    logged(coordinator, "worker w4 at 10.211.1.2:50053 is a standby")
    workers["w1"].stop()
    probe = hosts.run("coord", "-c", PROBE_SOURCE, f"http://{HTTP_LISTEN}", "1")
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout)
    assert result["generate"]["text"] == want
    assert [w["name"] for w in result["health"][0]["workers"]] == ["w4", "w2"]
    assert layers_on_disk(hosts.workdir / "home-w4") == {0, 1}
