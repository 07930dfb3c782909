from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import World
from tests.services.mirror import FaultProxy, Mirror


@pytest.fixture
def mirror(world: World, tmp_path: Path) -> Iterator[Mirror]:
    m = Mirror(tmp_path / "mirror", world.upstream.url)
    yield m
    m.stop()


@pytest.fixture
def proxied(world: World, tmp_path: Path):
    """A mirror whose upstream is a fault proxy the test can replace on the same port."""
    made: list[FaultProxy | Mirror] = []

    def make(*proxy_args: str, mirror_args: tuple[str, ...] = ()) -> tuple[FaultProxy, Mirror]:
        proxy = FaultProxy(tmp_path, world.upstream.url, *proxy_args)
        mirror = Mirror(tmp_path / "mirror", proxy.url, args=mirror_args)
        made.extend([proxy, mirror])
        return proxy, mirror

    def replace(proxy: FaultProxy, *proxy_args: str) -> FaultProxy:
        proxy.stop()
        new = FaultProxy(tmp_path, world.upstream.url, *proxy_args, port=proxy.port)
        made.append(new)
        return new

    yield make, replace
    for thing in reversed(made):
        thing.stop()
