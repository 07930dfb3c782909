"""The Docker Engine API, in one place: the client (hosts, contexts, TLS, version negotiation, errors people
can act on), what it holds of images, and the docker-archive writer. Used by dao pull, dao clean and the
agent; no feature reaches the engine another way.

The names below are looked up on first use (PEP 562): the aiohttp client is imported only by those who use
it, so ``dao pull``'s engine path (:mod:`dao.engine.wire`) starts without it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dao.engine.api import DEFAULT_HOST, EngineError, EngineInfo, go_arch, resolve_host
    from dao.engine.client import Engine

__all__ = ["DEFAULT_HOST", "Engine", "EngineError", "EngineInfo", "go_arch", "resolve_host"]

_WHERE = {"Engine": "dao.engine.client"}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'dao.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE.get(name, "dao.engine.api")), name)
