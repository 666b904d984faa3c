"""Authentication: the cluster token, TLS and mutual TLS on workers, API keys on HTTP.

Real gRPC workers on port 0 and a real HTTP server; certificates come from a
throwaway CA built in a fixture.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import anthropic
import grpc
import httpx
import mlx.core as mx
import openai
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlx_cluster.contract.auth import TlsFiles, load_api_keys, load_secret
from mlx_cluster.contract.config import ConfigError
from mlx_cluster.contract.config_loader import load_config, render_config
from mlx_cluster.contract.errors import Unauthenticated, WorkerUnavailable
from mlx_cluster.contract.proto import layer_service_pb2 as pb
from mlx_cluster.contract.proto import layer_service_pb2_grpc as pb_grpc
from mlx_cluster.contract.sampling import SamplingParams
from mlx_cluster.coordinator.api.app import create_app
from mlx_cluster.coordinator.api.server import HttpServer
from mlx_cluster.coordinator.engine.client import WorkerClient
from mlx_cluster.coordinator.engine.cluster import Cluster
from mlx_cluster.coordinator.engine.startup import start_from_config
from mlx_cluster.worker.runtime import WorkerSettings
from mlx_cluster.worker.server import RunningWorker, create_server

TOKEN = "tok-7f3a9c-correct-horse"
WRONG = "tok-000000-battery-staple"
API_KEY = "sk-test-4242"
SERVER_NAME = "worker.cluster.internal"  # a name in the worker's certificate, not its address


# --- certificates --------------------------------------------------------------------------


@dataclass
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    rogue_cert: str  # a client certificate from another CA
    rogue_key: str
    named_cert: str  # a worker certificate naming SERVER_NAME only, no address
    named_key: str


def _issue(
    cn: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    usage: list[x509.ObjectIdentifier] | None = None,
    sans: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for `cn`: a self-signed CA when `issuer` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = _issue("test cluster CA", None)
    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
        x509.DNSName(SERVER_NAME),
    ]
    # A worker serves, and calls the next worker of the decode ring with the same certificate.
    worker_usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    server = _issue("worker", ca, worker_usage, sans)
    client = _issue("coordinator", ca, [ExtendedKeyUsageOID.CLIENT_AUTH])
    rogue_ca = _issue("someone else's CA", None)
    rogue = _issue("intruder", rogue_ca, [ExtendedKeyUsageOID.CLIENT_AUTH])
    named = _issue("named worker", ca, worker_usage, [x509.DNSName(SERVER_NAME)])
    ca_path, _ = _write(folder, "ca", *ca)
    return Pki(
        ca_path,
        *_write(folder, "server", *server),
        *_write(folder, "client", *client),
        *_write(folder, "rogue", *rogue),
        *_write(folder, "named", *named),
    )


# --- workers ---------------------------------------------------------------------------------


@pytest.fixture
async def launch() -> AsyncIterator[Callable[..., object]]:
    """Start workers on 127.0.0.1:0 with create_server's keywords; returns their address."""
    running: list[RunningWorker] = []
    clients: list[WorkerClient] = []

    async def start(**kwargs: object) -> str:
        settings = WorkerSettings(name=f"worker-{len(running)}")
        worker = await create_server("127.0.0.1:0", settings, **kwargs)  # type: ignore[arg-type]
        running.append(worker)
        return f"127.0.0.1:{worker.port}"

    start.clients = clients  # type: ignore[attr-defined]
    yield start
    for client in clients:
        await client.close()
    for worker in running:
        await worker.stop(grace=None)


def client_of(launch, address: str, **kwargs: object) -> WorkerClient:
    client = WorkerClient(address, **kwargs)  # type: ignore[arg-type]
    launch.clients.append(client)
    return client


async def assert_refused(client: WorkerClient, *fragments: str) -> str:
    with pytest.raises(Unauthenticated) as info:
        await client.info(timeout=5)
    message = str(info.value)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    for fragment in fragments:
        assert fragment in message
    assert TOKEN not in message and WRONG not in message
    return message


async def test_token_is_required_and_never_echoed(launch):
    address = await launch(token=TOKEN)
    await assert_refused(client_of(launch, address), "missing cluster token")
    await assert_refused(client_of(launch, address, token=WRONG), "wrong cluster token")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.LayerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Info(pb.InfoRequest(), metadata=(("authorization", TOKEN),), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "malformed cluster token" in info.value.details()
    good = client_of(launch, address, token=TOKEN)
    assert (await good.info()).name == "worker-0"  # and it keeps serving after refusals


async def test_forward_stream_without_token_is_refused(launch):
    address = await launch(token=TOKEN)
    stream = client_of(launch, address, token=WRONG).open_stream(timeout=5)
    with pytest.raises(Unauthenticated, match="wrong cluster token"):
        await stream.step(["s"], mx.zeros((1, 1, 64)), [0])
    await stream.close()
    assert (await client_of(launch, address, token=TOKEN).info()).name == "worker-0"


async def test_health_checks_need_no_token(launch):
    address = await launch(token=TOKEN)
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- TLS -------------------------------------------------------------------------------------


async def test_tls_worker_refuses_plaintext_and_serves_tls(launch, pki):
    address = await launch(tls=TlsFiles(pki.server_cert, pki.server_key))
    with pytest.raises(WorkerUnavailable):
        await client_of(launch, address).info(timeout=3)
    assert (await client_of(launch, address, tls=TlsFiles(ca=pki.ca)).info()).name == "worker-0"
    # The name checked is the configured one when given, not the address.
    named = TlsFiles(ca=pki.ca, server_name=SERVER_NAME)
    assert (await client_of(launch, address, tls=named).info()).name == "worker-0"
    with pytest.raises(WorkerUnavailable):
        misnamed = TlsFiles(ca=pki.ca, server_name="elsewhere.example")
        await client_of(launch, address, tls=misnamed).info(timeout=3)


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(launch, pki):
    address = await launch(tls=TlsFiles(pki.server_cert, pki.server_key, pki.ca))
    for tls in (TlsFiles(ca=pki.ca), TlsFiles(pki.rogue_cert, pki.rogue_key, pki.ca)):
        with pytest.raises(WorkerUnavailable):
            await client_of(launch, address, tls=tls).info(timeout=3)
    tls = TlsFiles(pki.client_cert, pki.client_key, pki.ca)
    assert (await client_of(launch, address, tls=tls).info()).name == "worker-0"


def mutual_tls_config(
    pki: Pki, model: Path, addresses: list[str], **token: str
) -> dict[str, object]:
    """A cluster file's contents: these workers over mutual TLS, checked by SERVER_NAME,
    with `token` (token=... or token_file=...)."""
    auth = {
        **token,
        "tls_ca": pki.ca,
        "tls_cert": pki.client_cert,
        "tls_key": pki.client_key,
        "tls_server_name": SERVER_NAME,
    }
    return {
        "model": str(model),
        "workers": [{"address": a, "memory_gb": 8} for a in addresses],
        "kv": {"max_session_tokens": 512},
        "reserve_gb": 0.5,
        "auth": auth,
    }


async def test_cluster_from_config_over_token_and_mutual_tls(launch, pki, tiny_llama, tmp_path):
    server_tls = TlsFiles(pki.server_cert, pki.server_key, pki.ca)
    addresses = [await launch(token=TOKEN, tls=server_tls) for _ in range(2)]
    (tmp_path / "token").write_text(f"  {TOKEN}\n")
    config = mutual_tls_config(pki, tiny_llama, addresses, token_file=str(tmp_path / "token"))
    auth = config["auth"]
    assert isinstance(auth, dict)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    cluster = await start_from_config(load_config(path, dotenv=None, env={}).config)
    try:
        chunks = [c async for c in cluster.generate("the river", SamplingParams(max_tokens=6))]
        assert chunks[-1].finish_reason in {"stop", "length"} and chunks[-1].performance
    finally:
        await cluster.close()
    env = {"MLX_CLUSTER_AUTH__TOKEN": WRONG}  # with a token_file too: refused as ambiguous
    with pytest.raises(ConfigError, match="token or token_file, not both"):
        load_config(path, dotenv=None, env=env)
    config["auth"] = {**auth, "token_file": None, "token": WRONG}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(Unauthenticated, match="wrong cluster token") as info:
        await start_from_config(load_config(path, dotenv=None, env={}).config, ready_timeout=5)
    assert WRONG not in str(info.value)


async def test_workers_relay_to_each_other_by_the_name_in_their_certificates(
    launch, pki, tiny_llama, tmp_path
):
    """Certificates that name the workers only by auth.tls_server_name, not by the address:
    the decode ring's worker-to-worker calls check that name too."""
    server_tls = TlsFiles(pki.named_cert, pki.named_key, pki.ca)
    addresses = [await launch(token=TOKEN, tls=server_tls) for _ in range(3)]
    config = mutual_tls_config(pki, tiny_llama, addresses, token=TOKEN)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    cluster = await start_from_config(load_config(path, dotenv=None, env={}).config)
    try:
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        chunks = [c async for c in cluster.generate("the river", params)]
        assert chunks[-1].finish_reason == "length"
        assert cluster.engine.chain.replays == 0  # the ring never broke
    finally:
        await cluster.close()


# --- the loud warning ------------------------------------------------------------------------


async def test_open_worker_beyond_loopback_warns_loudly(caplog):
    caplog.set_level(logging.WARNING, logger="mlx_cluster.worker.server")
    for address, token, loud in [
        ("0.0.0.0:0", None, True),
        ("0.0.0.0:0", TOKEN, False),
        ("127.0.0.1:0", None, False),
    ]:
        caplog.clear()
        worker = await create_server(address, WorkerSettings(name="exposed"), token=token)
        await worker.stop(grace=None)
        warned = "NO cluster token" in caplog.text
        assert warned == loud, (address, token, caplog.text)


def test_worker_command_warns_and_reports_bad_token_file(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": ""}
    cmd = [sys.executable, "-m", "mlx_cluster", "worker", "--name", "w"]
    proc = subprocess.Popen(
        [*cmd, "--listen", "0.0.0.0:0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and '"ready"' in proc.stdout.readline()
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert "!!! SECURITY: worker w listens on 0.0.0.0" in stderr
    missing = tmp_path / "nope"
    result = subprocess.run(
        [*cmd, "--listen", "127.0.0.1:0", "--token-file", str(missing)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and f"cannot read --token-file {missing}" in result.stderr


# --- secrets and configuration ---------------------------------------------------------------


def test_secrets_from_files(tmp_path):
    (tmp_path / "token").write_text(f"\n {TOKEN} \n")
    assert load_secret("ignored", str(tmp_path / "token")) == TOKEN
    assert load_secret(f" {TOKEN}\n", None) == TOKEN and load_secret("", None) is None
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ConfigError) as info:
        load_secret(None, str(tmp_path / "empty"))
    assert str(info.value) == f"token file {tmp_path / 'empty'} is empty"
    (tmp_path / "keys").write_text("# one key a line\nsk-a\n\n  sk-b  \n")
    assert load_api_keys(["sk-0"], str(tmp_path / "keys")) == ["sk-0", "sk-a", "sk-b"]
    with pytest.raises(ConfigError, match=r"API keys file .* holds no key"):
        load_api_keys([], str(tmp_path / "empty"))


def test_auth_settings_from_the_environment_are_never_shown():
    env = {
        "MLX_CLUSTER_MODEL": "m",
        "MLX_CLUSTER_WORKERS": "h:1",
        "MLX_CLUSTER_AUTH__TOKEN": TOKEN,
        "MLX_CLUSTER_AUTH__API_KEYS": f"{API_KEY},sk-other",
    }
    loaded = load_config(None, env=env, dotenv=None)
    assert loaded.config.auth.token == TOKEN
    assert loaded.config.auth.api_keys == [API_KEY, "sk-other"]
    shown = render_config(loaded)
    assert TOKEN not in shown and API_KEY not in shown and "token: <hidden>" in shown
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load_config(None, env={**env, "MLX_CLUSTER_AUTH__TLS_CERT": "c.pem"}, dotenv=None)


# --- HTTP API keys ---------------------------------------------------------------------------


@pytest.fixture
async def keyed_api(start_workers, tiny_llama) -> AsyncIterator[tuple[str, Cluster]]:
    clients = await start_workers(2)
    cluster = await Cluster.start(tiny_llama, [c.address for c in clients])
    server = HttpServer(create_app(cluster, api_keys=[API_KEY, "sk-second"]), "127.0.0.1", 0)
    await server.start()
    yield server.url, cluster
    await server.stop()
    await cluster.close()


async def test_api_keys_with_the_openai_client(keyed_api):
    url, _ = keyed_api
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.models.list()
    assert info.value.status_code == 401
    assert info.value.body == {
        "message": "Incorrect API key provided.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0) as good:
        reply = await good.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert reply.choices[0].finish_reason in {"stop", "length"}


async def test_api_keys_with_the_anthropic_client_in_x_api_key(keyed_api):
    url, _ = keyed_api
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with anthropic.AsyncAnthropic(base_url=url, api_key="sk-wrong", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await bad.messages.create(**body)
    assert info.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Incorrect API key provided."},
    }
    async with anthropic.AsyncAnthropic(base_url=url, api_key=API_KEY, max_retries=0) as good:
        reply = await good.messages.create(**body)
    assert reply.stop_reason in {"end_turn", "max_tokens"}


async def test_api_keys_leave_health_and_root_open(keyed_api):
    url, _ = keyed_api
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/")).status_code == 200
        for path in ("/metrics", "/v1/models"):
            refused = await http.get(path)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert refused.json()["error"]["code"] == "invalid_api_key"
            assert "didn't provide an API key" in refused.json()["error"]["message"]
        posted = await http.post("/generate", json={"prompt": "x"}, headers={"Authorization": "x"})
        assert posted.status_code == 401
        keyed = await http.get("/metrics", headers={"Authorization": "bearer sk-second"})
        assert keyed.status_code == 200
