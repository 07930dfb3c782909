"""What one ``dao pull`` was asked for (apart from the path that does it, so that choosing the engine's own
pull imports nothing of the fetch-and-load path)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class PullOptions:
    reference: str
    platform: str | None = None
    mirrors: tuple[str, ...] = ()
    engine_mirrors: bool = True
    jobs: int = 32  # connections at most, across all blobs and sources (it starts with 16)
    per_source: int = 32  # connections to one source at once
    verify_upstream: bool = False  # resolve the tag at the registry itself, not through a mirror
    cache_dir: Path | None = None
    quiet: bool = False
    output: str | None = None  # oci:DIR or docker-archive:FILE instead of the engine
    progress: bool = False  # live bars (a terminal); otherwise one line per layer
    cache_max: int = 20 * 1024**3  # the content cache is pruned to this after each pull
    stall_timeout: float = 15.0  # seconds without a byte before a stream counts as broken
    insecure_registries: tuple[str, ...] = ()  # host[:port] or CIDR, beside the engine's insecure-registries
    load: bool = False  # fetch and load even when the engine could pull through a local accelerator
