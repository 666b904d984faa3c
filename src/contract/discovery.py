"""What a worker advertises on the local network (DNS-SD over multicast DNS), as both roles
read it: the service type and the TXT properties of one worker's record.

A record only says where a worker is and what it is; it grants nothing. A coordinator
still calls the worker with its cluster token, and a worker that requires one refuses a
coordinator without it, discovered or not.
"""

from __future__ import annotations

from dataclasses import dataclass

SERVICE_TYPE = "_mlx-cluster._tcp.local."


@dataclass(frozen=True)
class Advert:
    """One worker as its record describes it."""

    name: str  # the worker's --name
    address: str  # HOST:PORT to dial
    version: str  # package version
    protocol: int  # PROTOCOL_VERSION it speaks
    token_required: bool  # it refuses calls without its cluster token
    tls: bool  # it serves TLS
    device: str  # e.g. "gpu Apple M2 Max", "cpu Intel Xeon"
    memory_gb: float  # memory free when it started, in GB (1e9 bytes)

    def properties(self) -> dict[str, str]:
        """The record's TXT properties (the address travels as the record's own A + SRV)."""
        return {
            "name": self.name,
            "version": self.version,
            "protocol": str(self.protocol),
            "token_required": "1" if self.token_required else "0",
            "tls": "1" if self.tls else "0",
            "device": self.device,
            "memory_gb": f"{self.memory_gb:.1f}",
        }

    @classmethod
    def from_record(cls, address: str, properties: dict[bytes, bytes | None]) -> Advert:
        """An advert from a resolved record; missing or malformed fields read as empty."""
        text = {
            k.decode(errors="replace"): (v or b"").decode(errors="replace")
            for k, v in properties.items()
        }

        def number(key: str) -> float:
            try:
                return float(text.get(key, ""))
            except ValueError:
                return 0.0

        return cls(
            name=text.get("name") or address,
            address=address,
            version=text.get("version", ""),
            protocol=int(number("protocol")),
            token_required=text.get("token_required") == "1",
            tls=text.get("tls") == "1",
            device=text.get("device", ""),
            memory_gb=number("memory_gb"),
        )
