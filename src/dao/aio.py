"""Small asyncio helpers the features share."""

from __future__ import annotations

import asyncio
import random
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


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before try ``attempt + 1``: exponential, capped, with "equal jitter" (half fixed, half
    random), so retries of many transfers that broke together spread out but never come back at once."""
    return min(base * 2**attempt, cap) * random.uniform(0.5, 1.0)


def full_jitter(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before reconnect ``attempt + 1``: anywhere between 0 and the capped exponential. For
    many clients that lost one server together (agents when the console restarts): they come back spread
    over the whole window instead of in waves."""
    return random.uniform(0, min(base * 2**attempt, cap))


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first real exception in a task group's (possibly nested) group: the one to show the caller."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        return exc
    return group
