"""Credentials shared by both roles: the cluster token, TLS files, HTTP API keys.

The coordinator sends the cluster token on every gRPC call as the metadata
`authorization: Bearer <token>`; workers compare it in constant time. TLS on
the worker port is optional; a worker given a CA also requires client
certificates signed by it (mutual TLS). Secrets are never put in messages.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from mlx_cluster.contract.config import AuthConfig, ConfigError

# gRPC metadata key (lower case) carrying "Bearer <token>".
TOKEN_METADATA_KEY = "authorization"
BEARER = "Bearer "
# Where a worker started from the command line (or by `up`) finds the token.
TOKEN_ENV = "MLX_CLUSTER_AUTH__TOKEN"


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def load_secret(value: str | None, file: str | None, what: str = "token file") -> str | None:
    """The secret from `file` when one is given, else `value`; stripped; None when unset.

    Raises:
        ConfigError: the file cannot be read or holds only whitespace (names the file).
    """
    if file:
        secret = _read_text(file, what).strip()
        if not secret:
            raise ConfigError(f"{what} {file} is empty")
        return secret
    return value.strip() if value and value.strip() else None


def load_api_keys(keys: Iterable[str], file: str | None) -> list[str]:
    """`keys` plus those in `file` (one a line; blank lines and `#` comments skipped).

    Raises:
        ConfigError: the file cannot be read or holds no key.
    """
    found = [k.strip() for k in keys if k.strip()]
    if file:
        lines = [line.strip() for line in _read_text(file, "API keys file").splitlines()]
        from_file = [line for line in lines if line and not line.startswith("#")]
        if not from_file:
            raise ConfigError(f"API keys file {file} holds no key")
        found += from_file
    return found


def secret_matches(given: str, secrets: Iterable[str]) -> bool:
    """Whether `given` equals one of `secrets`, in time independent of where they differ."""
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(given.encode(), secret.encode())
    return matched


def token_metadata(token: str) -> tuple[str, str]:
    """The metadata pair that carries `token`."""
    return (TOKEN_METADATA_KEY, BEARER + token)


def is_loopback(host: str) -> bool:
    """Whether `host` ("127.0.0.1", "[::1]", "localhost", ...) only accepts local connections."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # any other host name may resolve to a public interface
        return False


# --- TLS ---------------------------------------------------------------------------------


def _pem(path: str | None, what: str) -> bytes | None:
    return _read_text(path, what).encode() if path else None


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS on the worker port, as seen from one side."""

    cert: str | None = None  # this side's certificate chain (a worker's; a client's for mTLS)
    key: str | None = None  # the private key of `cert`
    ca: str | None = None  # CA of the other side: a worker then requires client certificates
    server_name: str | None = None  # client only: name in the worker's certificate, if not its host

    def server_credentials(self) -> grpc.ServerCredentials:
        """A worker's credentials; with `ca`, clients must present a certificate it signed."""
        if not (self.cert and self.key):
            raise ConfigError("TLS on a worker needs both a certificate and its key")
        cert = _pem(self.cert, "TLS certificate")
        key = _pem(self.key, "TLS key")
        ca = _pem(self.ca, "TLS CA certificate")
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """A client's credentials: verify the worker against `ca` (else the system's roots)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca, "TLS CA certificate"),
            private_key=_pem(self.key, "TLS key"),
            certificate_chain=_pem(self.cert, "TLS certificate"),
        )


def client_credentials(auth: AuthConfig) -> tuple[str | None, TlsFiles | None]:
    """The token and TLS files the coordinator uses towards its workers.

    TLS is on when `auth.tls_ca` or `auth.tls_cert` is set.
    """
    token = load_secret(auth.token, auth.token_file, "auth.token_file")
    if not (auth.tls_ca or auth.tls_cert):
        return token, None
    return token, TlsFiles(auth.tls_cert, auth.tls_key, auth.tls_ca, auth.tls_server_name)
