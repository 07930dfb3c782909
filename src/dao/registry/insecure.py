"""Which registries are spoken to without TLS verification, decided as the Docker engine decides it.

The engine's ``/info`` says it in ``RegistryConfig``: ``IndexConfigs[name].Secure`` for registries named in
``insecure-registries`` (and Docker Hub's mirrors), ``InsecureRegistryCIDRs`` for address ranges (default
``127.0.0.0/8``). A registry named in IndexConfigs gets its ``Secure``; otherwise it is insecure when any
address its host name resolves to lies in one of the ranges (moby ``registry/config.go`` ``isSecureIndex``).
For an insecure registry docker tries HTTPS without verifying the certificate, then plain HTTP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_CIDRS: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

Resolver = Callable[[str], Awaitable[list[str]]]


async def resolve(host: str) -> list[str]:
    """Every address ``host`` resolves to; none when it does not resolve (docker then treats it as secure)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True, slots=True)
class InsecureRegistries:
    secure: Mapping[str, bool]  # host[:port] -> Secure, from the engine's IndexConfigs
    cidrs: tuple[IPNetwork, ...] = DEFAULT_CIDRS

    @classmethod
    def from_engine(cls, registry_config: Mapping[str, Any] | None) -> InsecureRegistries:
        """From ``/info``'s ``RegistryConfig``; docker's defaults when the engine says nothing."""
        config = registry_config or {}
        secure = {
            str(name): bool((index or {}).get("Secure", True))
            for name, index in (config.get("IndexConfigs") or {}).items()
            if isinstance(index, dict)
        }
        cidrs: list[IPNetwork] = []
        for entry in config.get("InsecureRegistryCIDRs") or []:
            network = _network(entry if isinstance(entry, str) else _go_ipnet(entry))
            if network is not None:
                cidrs.append(network)
        return cls(secure, tuple(cidrs) if "InsecureRegistryCIDRs" in config else DEFAULT_CIDRS)

    def adding(self, entries: Iterable[str]) -> InsecureRegistries:
        """Plus ``--insecure-registry`` entries: ``host[:port]`` or a CIDR, as in daemon.json."""
        secure, cidrs = dict(self.secure), list(self.cidrs)
        for entry in entries:
            network = _network(entry) if "/" in entry else None
            if network is not None:
                cidrs.append(network)
            else:
                secure[entry.lower()] = False
        return InsecureRegistries(secure, tuple(cidrs))

    async def insecure(self, registry: str, resolver: Resolver = resolve) -> bool:
        if registry in self.secure:
            return not self.secure[registry]
        host = registry
        if registry.startswith("["):
            host = registry[1:].split("]", 1)[0]
        elif registry.count(":") == 1:
            host = registry.rsplit(":", 1)[0]
        addresses = await addresses_of(host, resolver)
        return any(address in network for address in addresses for network in self.cidrs)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


async def addresses_of(host: str, resolver: Resolver = resolve) -> list[IPAddress]:
    """``host`` itself when it is an address (``[v6]`` too), else what it resolves to."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    addresses: list[IPAddress] = []
    for text in await resolver(host):
        try:
            addresses.append(ipaddress.ip_address(text.split("%", 1)[0]))
        except ValueError:
            continue
    return addresses


def _network(text: str | None) -> IPNetwork | None:
    if not text:
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def _go_ipnet(entry: Any) -> str | None:
    """Old engines send ``{"IP": "127.0.0.0", "Mask": "/wAAAA=="}`` (the mask base64) instead of a string."""
    import base64

    if not isinstance(entry, dict) or "IP" not in entry or "Mask" not in entry:
        return None
    try:
        mask = base64.b64decode(str(entry["Mask"]))
    except ValueError:
        return None
    prefix = sum(bin(byte).count("1") for byte in mask)
    return f"{entry['IP']}/{prefix}"
