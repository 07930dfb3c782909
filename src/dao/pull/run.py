"""A whole ``dao pull``: sources, plan, blobs, load, and the lines docker prints."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from dao.docker import Engine
from dao.oci.manifest import Platform
from dao.oci.reference import DOCKER_HUB_DOMAIN, Reference
from dao.pull.fetch import BlobCache, Stats, default_cache_dir
from dao.pull.load import chain_ids, docker_archive, engine_chain_ids
from dao.pull.plan import PullError, Source, resolve
from dao.registry.client import RegistryClient
from dao.registry.dockerconfig import credentials_for


@dataclass(frozen=True, slots=True)
class PullOptions:
    reference: str
    platform: str | None = None
    mirrors: tuple[str, ...] = ()
    engine_mirrors: bool = True
    jobs: int = 4  # blobs at once
    cache_dir: Path | None = None
    quiet: bool = False


def _platform(text: str | None, engine_os: str, engine_arch: str) -> Platform:
    if not text:
        return Platform(engine_os, engine_arch)
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise PullError(f"invalid platform {text!r}: use os/arch[/variant], e.g. linux/arm64")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


async def pull(options: PullOptions, out: Callable[[str], None] = print) -> int:
    ref = Reference.parse(options.reference)
    async with Engine() as engine, aiohttp.ClientSession(auto_decompress=False) as session:
        info = await engine.negotiate()
        platform = _platform(options.platform, info.os, info.arch)
        mirror_urls = list(options.mirrors)
        if ref.domain == DOCKER_HUB_DOMAIN and options.engine_mirrors:
            mirror_urls += [m for m in info.mirrors if m not in mirror_urls]

        def client(url: str) -> RegistryClient:  # a mirror you logged in to gets its own credentials
            creds = credentials_for(url.split("://", 1)[-1].rstrip("/"), warn=warn)
            return RegistryClient(url, session, credentials=creds)

        sources = [Source(url, client(url), True) for url in mirror_urls]
        registry = registry_url(ref.registry_host)
        registry_client = RegistryClient(registry, session, credentials=credentials_for(ref.domain, warn=warn))
        sources.append(Source(registry, registry_client, False))

        if not options.quiet:
            name = dataclasses.replace(ref, tag=None, digest=None).familiar()
            out(f"{ref.tag or ref.digest}: Pulling from {name}")
        plan = await resolve(ref, sources, platform)
        ordered = [plan.source] + [s for s in sources if s is not plan.source]
        cache = BlobCache(options.cache_dir or default_cache_dir())
        stats = Stats()
        config_path = await cache.get(ref.path, plan.config, ordered, stats)
        config = await asyncio.to_thread(config_path.read_bytes)
        diff_ids = [str(d) for d in json.loads(config).get("rootfs", {}).get("diff_ids", [])]
        if len(diff_ids) != len(plan.layers):
            raise PullError(f"{ref.familiar()}: config lists {len(diff_ids)} layers, manifest {len(plan.layers)}")
        tag = ref.familiar() if ref.tag else None
        image_id = str(plan.config.digest)
        present = await engine.inspect_image(tag) if tag else await engine.inspect_image(image_id)
        if present is not None and present.get("Id") == image_id:
            _finish(out, options, plan.digest, f"Image is up to date for {ref.familiar()}", ref)
            return 0

        have = set() if info.containerd_store else await engine_chain_ids(engine)
        chains = chain_ids(diff_ids)
        skip = {i for i, chain in enumerate(chains) if chain in have}
        gate = asyncio.Semaphore(max(1, options.jobs))

        async def one(i: int) -> Path | None:
            layer = plan.layers[i]
            short = layer.digest.encoded[:12]
            if i in skip:
                if not options.quiet:
                    out(f"{short}: Already exists")
                return None
            async with gate:
                path = await cache.get(ref.path, layer, ordered, stats)
            if not options.quiet:
                out(f"{short}: Pull complete")
            return path

        paths = await asyncio.gather(*(one(i) for i in range(len(plan.layers))))
        layers = [(f"{layer.digest.encoded}/layer.tar", path) for layer, path in zip(plan.layers, paths, strict=True)]
        await engine.load(docker_archive(f"{plan.config.digest.encoded}.json", config, [tag] if tag else [], layers))
        _finish(out, options, plan.digest, f"Downloaded newer image for {ref.familiar()}", ref)
        _summary(stats, skipped=len(skip))
        return 0


def warn(line: str) -> None:
    print(f"dao: warning: {line}", file=sys.stderr)


def registry_url(host: str) -> str:
    """Like docker: HTTPS, except plain HTTP for loopback registries (docker's default insecure registries)."""
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host
    loopback = name in ("localhost", "::1", "[::1]") or name.startswith("127.")
    return f"{'http' if loopback else 'https'}://{host}"


def _finish(out: Callable[[str], None], options: PullOptions, digest: object, status: str, ref: Reference) -> None:
    if options.quiet:
        out(str(ref))
        return
    out(f"Digest: {digest}")
    out(f"Status: {status}")
    out(str(ref))


def _summary(stats: Stats, *, skipped: int) -> None:
    elapsed = max(time.monotonic() - stats.started, 1e-6)
    total = sum(stats.bytes_by_source.values())
    per_source = ", ".join(f"{n / 1e6:.1f} MB from {url}" for url, n in stats.bytes_by_source.items()) or "nothing"
    print(
        f"dao: {per_source}; {stats.cached_bytes / 1e6:.1f} MB from the local cache; {skipped} layers already "
        f"in the engine; {elapsed:.1f} s, {total / elapsed / 1e6:.1f} MB/s",
        file=sys.stderr,
    )
