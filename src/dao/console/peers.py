"""Peers: the console tells each host whose agent runs a local accelerator (``dao agent run
--local-accelerator``) where the same user's other such hosts serve their cached blobs, and the secret they
sign their requests to each other with (``docs/pull.md``, "Peers").

- **Who**: the user's hosts with an open channel to this console node whose hello said ``peer_port``; each
  is reached at the address its channel came from (a host behind NAT that others cannot reach costs them one
  refused connection per blob, and is then left out of that blob's fetch). Hosts on other console nodes
  (``--redis``) are not among them yet.
- **The secret** is derived, not stored: an HMAC of the user's ID under the console's secret, so every
  console node gives the same one, and no other user's hosts can sign for this user's peers.
- **When**: a :class:`~dao.channel.frames.Peers` frame to each of the user's such hosts when one of them
  connects or goes away.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress

from aiohttp import web

from dao.channel.frames import Peers, encode
from dao.console.hub import Hub


class Peering:
    def __init__(self, hub: Hub, secret: bytes) -> None:
        self.hub, self._secret = hub, secret
        self.ports: dict[str, int] = {}  # host ID -> the port its local accelerator serves peers on

    def secret_of(self, user_id: str) -> str:
        return hmac.new(self._secret, f"peers {user_id}".encode(), hashlib.sha256).hexdigest()

    def url_of(self, host_id: str) -> str | None:
        port, address = self.ports.get(host_id), self.hub.addresses.get(host_id, "")
        if port is None or not address:
            return None
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(address).version == 6:
                address = f"[{address}]"
        return f"http://{address}:{port}"

    async def joined(self, host_id: str, user_id: str, facts: dict[str, object]) -> None:
        port = facts.get("peer_port")
        if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
            self.ports[host_id] = port
            await self.share(user_id)

    async def left(self, host_id: str, user_id: str) -> None:
        if self.ports.pop(host_id, None) is not None:
            await self.share(user_id)

    async def share(self, user_id: str) -> None:
        """Each of the user's peer hosts hears the others."""
        mine = [h for h in self.ports if self.hub.owners.get(h) == user_id and h in self.hub.channels]
        urls = {h: self.url_of(h) for h in mine}
        secret = self.secret_of(user_id)
        for host_id in mine:
            others = sorted(u for h, u in urls.items() if h != host_id and u is not None)
            ws = self.hub.channels.get(host_id)
            if ws is not None and not ws.closed:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_str(encode(Peers(secret, others)))


PEERING_KEY = web.AppKey("dao_peering", Peering)
