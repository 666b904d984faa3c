"""Three hosts in network namespaces: a coordinator and two workers behind slow links.

    mlxc-w1-TAG                  mlxc-coord-TAG                  mlxc-w2-TAG
    10.211.1.2 ---- veth ---- 10.211.1.1 | 10.211.2.1 ---- veth ---- 10.211.2.2
          1 ms, like Thunderbolt         |        5 ms, like Wi-Fi

The coordinator's host routes between its links, as a switch would: the workers reach
each other through it, which the decode ring needs (the first worker sends hidden states
to the second, which answers with the token). The delay is added once per round trip,
on the coordinator's side of each link, as `tc netem` on its egress: every request to a
worker waits that long, so a worker's round trip in /health is the configured delay plus
the call itself. Netem on both ends would count it twice.
Where the kernel has no netem (some VM kernels ship without sch_netem), a relay in the
worker's namespace holds the coordinator's bytes for the same time instead.

Needs root and iproute2; skipped otherwise. Namespaces and processes are removed at the
end whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import IO, TypeVar

import pytest

from mlx_cluster.models.random_model import build_random_model

WORKER_PORT = 50051
RELAY_TARGET_PORT = 50052  # the worker's own port when a relay adds the delay
HTTP_LISTEN = "127.0.0.1:8100"  # the coordinator namespace's own loopback
LINKS = {"w1": (1, 1.0), "w2": (2, 5.0)}  # worker -> (subnet 10.211.N.0/24, delay ms)
START_TIMEOUT_S = 90
HEALTH_SAMPLES = 15  # the fastest of these is the link's floor, whatever the load

# LISTEN -> TARGET, holding the bytes from the coordinator (the client) for DELAY ms, in
# order, like netem on the coordinator's egress; the answers pass straight through.
RELAY_SOURCE = """
import asyncio, json, sys

listen, target, delay = sys.argv[1], sys.argv[2], float(sys.argv[3]) / 1000  # DELAY ms

async def pipe(reader, writer, wait):
    loop = asyncio.get_running_loop()
    held = asyncio.Queue()

    async def take():
        while data := await reader.read(65536):
            held.put_nowait((loop.time() + wait, data))
        held.put_nowait((0.0, b""))

    taker = asyncio.create_task(take())
    try:
        while (item := await held.get())[1]:
            await asyncio.sleep(max(item[0] - loop.time(), 0))
            writer.write(item[1])
            await writer.drain()
    finally:
        taker.cancel()
        writer.close()

async def connection(client_reader, client_writer):
    host, port = target.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    await asyncio.gather(
        pipe(client_reader, writer, delay), pipe(reader, client_writer, 0.0),
        return_exceptions=True,
    )

async def main():
    host, port = listen.rsplit(":", 1)
    server = await asyncio.start_server(connection, host, int(port))
    print(json.dumps({"event": "ready", "address": listen}), flush=True)
    await server.serve_forever()

asyncio.run(main())
"""

# Runs inside the coordinator's namespace: one generation, then /health a few times.
PROBE_SOURCE = """
import json, sys, urllib.request

url, samples = sys.argv[1], int(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
body = json.dumps({"prompt": "hello", "max_tokens": 8}).encode()
request = urllib.request.Request(url + "/generate", body, {"Content-Type": "application/json"})
with opener.open(request, timeout=60) as response:
    generated = json.load(response)
health = []
for _ in range(samples):
    with opener.open(url + "/health", timeout=10) as response:
        health.append(json.load(response))
print(json.dumps({"generate": generated, "health": health}))
"""


def ip(command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip COMMAND` (words split on spaces)."""
    args = ["ip", *command.split()]
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=check)


def require_namespaces(tag: str) -> None:
    """Skip unless this process may create network namespaces."""
    if not sys.platform.startswith("linux"):
        pytest.skip(f"network namespaces are Linux-only, this is {sys.platform}")
    probe = f"mlxc-probe-{tag}"
    try:
        made = ip(f"netns add {probe}", check=False)
    except FileNotFoundError:
        pytest.skip("iproute2's `ip` is not installed")
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace (root needed): {made.stderr.strip()}")
    ip(f"netns del {probe}", check=False)


# --- processes --------------------------------------------------------------------------


class Process:
    """A command in a namespace; two reader threads collect its output lines."""

    def __init__(self, namespace: str, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", namespace, *args],  # ip execs the command: same PID
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(stream,), daemon=True)
            for stream in (self.popen.stdout, self.popen.stderr)
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, wanted: Callable[[str], bool], timeout: float = START_TIMEOUT_S) -> str:
        """The first output line for which `wanted` is true; raises if it exits first."""
        deadline, closed = time.monotonic() + timeout, 0
        while closed < 2:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if line is None:
                closed += 1
            elif wanted(line):
                return line
        tail = "".join(self.output[-20:])
        raise AssertionError(f"{' '.join(self.args[1:4])} not ready within {timeout} s:\n{tail}")

    def stop(self, grace: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for reader in self.readers:
            reader.join(5)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


def ready_address(process: Process) -> str:
    line = process.wait_for(lambda text: text.startswith('{"event": "ready"'))
    return json.loads(line)["address"]


# --- the three hosts --------------------------------------------------------------------


@dataclass
class Hosts:
    tag: str  # in every namespace and interface name, unique to this run
    workdir: Path
    delay_mode: str = "netem"  # or "relay" where the kernel has no netem
    processes: list[Process] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return f"mlxc-{host}-{self.tag}"

    def build(self) -> None:
        coord = self.ns("coord")
        ip(f"netns add {coord}")
        ip(f"-n {coord} link set lo up")
        for host, (subnet, _delay) in LINKS.items():
            ns, near, far = self.ns(host), f"mxc{self.tag}{subnet}", f"mxw{self.tag}{subnet}"
            ip(f"netns add {ns}")
            ip(f"-n {ns} link set lo up")
            # Both ends are created inside their namespaces: nothing in the root namespace.
            ip(f"link add {near} netns {coord} type veth peer name {far} netns {ns}")
            ip(f"-n {coord} addr add 10.211.{subnet}.1/24 dev {near}")
            ip(f"-n {ns} addr add 10.211.{subnet}.2/24 dev {far}")
            ip(f"-n {coord} link set {near} up")
            ip(f"-n {ns} link set {far} up")
            ip(f"-n {ns} route add default via 10.211.{subnet}.1")
        ip(f"netns exec {coord} sysctl -q -w net.ipv4.ip_forward=1")
        self._add_delays()

    def _add_delays(self) -> None:
        """Netem on the coordinator's end of each link, or relays where netem is missing."""
        for n, (subnet, delay) in enumerate(LINKS.values()):
            device = f"mxc{self.tag}{subnet}"
            tc = f"tc qdisc add dev {device} root netem delay {delay:g}ms"
            try:
                added = ip(f"netns exec {self.ns('coord')} {tc}", check=n > 0)
            except FileNotFoundError:  # `ip` is there, `tc` is not
                added = subprocess.CompletedProcess(tc, 127, "", "tc is not installed")
            if added.returncode != 0:
                reason = added.stderr.strip()
                warnings.warn(f"no tc netem ({reason}): relays add the delays", stacklevel=2)
                self.delay_mode = "relay"
                return

    def spawn(self, host: str, *args: str) -> Process:
        """Start `python ARGS...` on `host`."""
        process = Process(self.ns(host), [sys.executable, *args], self.env(), self.workdir)
        self.processes.append(process)
        return process

    def run(self, host: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `python ARGS...` on `host` to the end."""
        command = ["ip", "netns", "exec", self.ns(host), sys.executable, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    def env(self) -> dict[str, str]:
        # The coordinator takes every MLX_CLUSTER_* variable as a setting.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_CLUSTER_")}
        env["HF_HUB_OFFLINE"] = "1"
        return env

    def close(self) -> None:
        """Stop every process, then delete the namespaces (their veths go with them)."""
        for process in reversed(self.processes):
            process.stop()
        for host in ("coord", *LINKS):
            ns = self.ns(host)
            pids = ip(f"netns pids {ns}", check=False)
            if pids.returncode != 0:
                continue  # never created
            for pid in pids.stdout.split():  # anything that escaped stop()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            ip(f"netns del {ns}", check=False)


HostsT = TypeVar("HostsT", bound=Hosts)


@contextlib.contextmanager
def built(kind: Callable[[str, Path], HostsT], tmp_path: Path) -> Iterator[HostsT]:
    """Hosts of `kind` built in namespaces of their own, removed whatever happens."""
    tag = f"{os.getpid():x}{secrets.token_hex(1)}"  # interface names stay <= 15 characters
    require_namespaces(tag)
    hosts = kind(tag, tmp_path)
    try:
        hosts.build()
        yield hosts
    finally:
        hosts.close()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    with built(Hosts, tmp_path) as made:
        yield made


def start_worker(hosts: Hosts, name: str) -> Process:
    """The worker `name` on its own host, reachable at 10.211.N.2:50051."""
    subnet, delay = LINKS[name]
    address = f"10.211.{subnet}.2:{WORKER_PORT}"
    listen = address if hosts.delay_mode == "netem" else f"10.211.{subnet}.2:{RELAY_TARGET_PORT}"
    worker = hosts.spawn(name, "-m", "mlx_cluster", "worker", "--listen", listen, "--name", name)
    if hosts.delay_mode == "relay":
        relay = hosts.spawn(name, "-c", RELAY_SOURCE, address, listen, str(delay))
        assert ready_address(relay) == address
    return worker


@pytest.mark.slow
def test_workers_behind_slow_links_serve_and_report_round_trips(hosts: Hosts) -> None:
    model = build_random_model(hosts.workdir / "m", "llama", num_layers=4)
    workers = [start_worker(hosts, name) for name in LINKS]
    listening = [ready_address(w) for w in workers]
    assert [a.rsplit(":", 1)[0] for a in listening] == ["10.211.1.2", "10.211.2.2"]
    configured = [f"10.211.{subnet}.2:{WORKER_PORT}" for subnet, _ in LINKS.values()]
    args = ["-m", "mlx_cluster", "coordinator", "--model", str(model), "--listen", HTTP_LISTEN]
    for address in configured:
        args += ["--worker", address]
    coordinator = hosts.spawn("coord", *args)
    coordinator.wait_for(lambda line: "serving" in line and "on http" in line)

    # The API listens on the coordinator namespace's loopback: ask from inside it.
    probe = hosts.run("coord", "-c", PROBE_SOURCE, f"http://{HTTP_LISTEN}", str(HEALTH_SAMPLES))
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout)
    assert result["generate"]["text"] and result["generate"]["usage"]["completion_tokens"] > 0

    for health in result["health"]:
        assert health["status"] == "ok", health
        assert [w["address"] for w in health["workers"]] == configured
        assert [w["name"] for w in health["workers"]] == list(LINKS)
    trips = {
        name: [h["workers"][i]["last_round_trip_ms"] for h in result["health"]]
        for i, name in enumerate(LINKS)
    }
    fastest = {name: min(ms) for name, ms in trips.items()}
    typical = {name: median(ms) for name, ms in trips.items()}
    print(f"delays by {hosts.delay_mode}; round trips (ms): fastest {fastest}, median {typical}")
    assert fastest["w1"] >= 0.9, trips
    assert fastest["w2"] >= 4.0, trips
    assert fastest["w2"] > fastest["w1"], trips
