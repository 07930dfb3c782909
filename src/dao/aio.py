"""Small asyncio helpers the features share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


async def gather_bounded(items: Iterable[T], fn: Callable[[T], Awaitable[R]], at_once: int) -> list[R]:
    """``fn(item)`` for every item, at most ``at_once`` running at a time; the results in the items' order.
    The first exception propagates, as with ``asyncio.gather``."""
    gate = asyncio.Semaphore(at_once)

    async def one(item: T) -> R:
        async with gate:
            return await fn(item)

    return list(await asyncio.gather(*(one(item) for item in items)))
