"""What the engine holds of images, in the terms dao pull and dao clean decide by."""

from __future__ import annotations

from dao.aio import gather_bounded
from dao.engine.client import Engine
from dao.oci.layers import chain_ids


async def engine_chain_ids(engine: Engine, at_once: int = 8) -> set[str]:
    """Every layer chain the engine holds, from its images' RootFS layers (one inspect per image, several at
    once: a host with hundreds of images answers in a fraction of a second)."""
    ids = [str(image.get("Id", "")) for image in await engine.images()]
    have: set[str] = set()
    for inspected in await gather_bounded(ids, engine.inspect_image, at_once):
        layers = ((inspected or {}).get("RootFS") or {}).get("Layers") or []
        have.update(chain_ids([str(layer) for layer in layers]))
    return have
