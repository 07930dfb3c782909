"""The mirror's proxies, one per upstream registry, made on first use; they share one in-flight map, so a
layer two registries both serve is fetched once and stored once."""

from __future__ import annotations

from collections.abc import Callable

from dao.mirror.inflight import Inflight
from dao.mirror.proxy import Proxy


class Proxies:
    """One :class:`Proxy` per upstream registry, made on first use; the in-flight fetches are shared."""

    def __init__(self, make: Callable[[str], Proxy], inflight: Inflight) -> None:
        self._make = make
        self._proxies: dict[str, Proxy] = {}
        self.inflight = inflight

    def get(self, registry: str) -> Proxy:
        proxy = self._proxies.get(registry)
        if proxy is None:
            proxy = self._proxies[registry] = self._make(registry)
        return proxy

    def states(self) -> list[tuple[str, str, int | None]]:
        """Per registry in use: circuit state and the upstream's remaining pull allowance (for metrics)."""
        return [
            (name, proxy.breaker.state.value, proxy.client.ratelimit_remaining) for name, proxy in self._proxies.items()
        ]

    async def aclose(self) -> None:
        for proxy in self._proxies.values():
            await proxy.aclose()
        await self.inflight.aclose()
