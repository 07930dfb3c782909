"""A whole ``dao pull``: sources, plan, blobs, load, and the lines docker prints."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import platform as py_platform
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp

from dao.config import ConfigError, PullConfig, load
from dao.engine import Engine, go_arch
from dao.engine.archive import docker_archive
from dao.engine.images import engine_chain_ids
from dao.oci.digest import Digest
from dao.oci.layers import chain_ids
from dao.oci.manifest import DEFAULT_ACCEPT, Descriptor, Platform
from dao.oci.reference import DOCKER_HUB_DOMAIN, Reference
from dao.paths import config_file
from dao.pull.cache import BlobCache, default_cache_dir
from dao.pull.fetch import Fetcher
from dao.pull.load import parse_output, write_oci_layout, write_stream
from dao.pull.native import engine_pull, local_accelerator, why_not
from dao.pull.options import PullOptions
from dao.pull.output import finish, progress_bars, warn
from dao.pull.plan import PullError, Source, resolve
from dao.pull.route import peers, rank
from dao.registry.client import RegistryClient, RetryPolicy, registry_timeout
from dao.registry.dockerconfig import credentials_for
from dao.registry.errors import RegistryClientError
from dao.registry.insecure import InsecureRegistries
from dao.transfer.schedule import Stats

if TYPE_CHECKING:
    from rich.progress import TaskID

INSECURE_PROBE_TIMEOUT = 5.0  # seconds for an insecure registry to answer over HTTPS before HTTP is tried
T = TypeVar("T")


def _platform(text: str | None, engine_os: str, engine_arch: str) -> Platform:
    if not text:
        return Platform(engine_os, engine_arch)
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise PullError(f"invalid platform {text!r}: use os/arch[/variant], e.g. linux/arm64")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


async def pull(options: PullOptions, out: Callable[[str], None] = print, *, not_engine: str | None = None) -> int:
    """``not_engine``: why the engine's own pull is not the path, when :func:`dao.pull.native.engine_path`
    already found out (it is not asked again)."""
    ref = Reference.parse(options.reference)
    output = parse_output(options.output) if options.output else None
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession(auto_decompress=False))
        engine: Engine | None = None
        registry_config = None
        loaded_because = ""  # why the engine did not pull it itself (the summary says it)
        if output is None:  # into the engine: its platform, its mirrors, its layers, its insecure registries
            engine = await stack.enter_async_context(Engine())
            info = await engine.negotiate()
            platform = _platform(options.platform, info.os, info.arch)
            engine_mirrors = info.mirrors if options.engine_mirrors else ()
            registry_config = info.registry_config
            accelerator = None
            if ref.domain == DOCKER_HUB_DOMAIN and not options.load and not_engine is None:
                accelerator = await asyncio.to_thread(local_accelerator, engine_mirrors)
            why = not_engine or why_not(
                ref,
                accelerator,
                mirrors=bool(options.mirrors),
                verify_upstream=options.verify_upstream,
                load=options.load,
            )
            if not why:
                assert accelerator is not None
                return await engine_pull(
                    engine, ref, options.platform, quiet=options.quiet, bars=options.progress, out=out, warn=warn,
                    accelerator=accelerator,
                )  # fmt: skip
            loaded_because = why
        else:
            platform = _platform(options.platform, "linux", go_arch(py_platform.machine()))
            engine_mirrors = ()
        insecure = InsecureRegistries.from_engine(registry_config).adding(options.insecure_registries)
        mirror_urls = list(options.mirrors) + [m for m in configured_mirrors() if m not in options.mirrors]
        if ref.domain == DOCKER_HUB_DOMAIN:
            mirror_urls += [m for m in engine_mirrors if m not in mirror_urls]

        def client(url: str) -> RegistryClient:  # a mirror you logged in to gets its own credentials
            creds = credentials_for(url.split("://", 1)[-1].rstrip("/"), warn=warn)
            return RegistryClient(url, session, credentials=creds, timeout=_timeout(options), namespace=ref.domain)

        sources = [Source(url, client(url), True) for url in mirror_urls]
        registry, verify = await registry_endpoint(ref, insecure, session)
        registry_client = RegistryClient(
            registry,
            session,
            credentials=credentials_for(ref.domain, warn=warn),
            timeout=_timeout(options),
            tls_verify=verify,
        )
        sources.append(Source(registry, registry_client, False))
        sources = await rank(sources, warn, registry=ref.domain)

        if not options.quiet:
            name = dataclasses.replace(ref, tag=None, digest=None).familiar()
            out(f"{ref.tag or ref.digest}: Pulling from {name}")
        target = ref
        if options.verify_upstream and ref.digest is None:
            target = await pinned(ref, registry_client, registry)
        plan = await resolve(target, sources, platform)
        ordered = [plan.source] + [s for s in sources if s is not plan.source]
        cache = BlobCache(options.cache_dir or default_cache_dir())
        stats = Stats()
        fetcher = Fetcher(
            cache,
            peers(ordered),
            stats,
            connections=options.jobs,
            per_source=options.per_source,
            stall_timeout=options.stall_timeout,
            warn=warn,
        )
        tag = ref.familiar() if ref.tag else None
        have: set[str] = set()
        if engine is not None:
            image_id = str(plan.config.digest)
            present = await engine.inspect_image(tag) if tag else await engine.inspect_image(image_id)
            if present is not None and present.get("Id") == image_id:
                finish(out, options.quiet, plan.digest, f"Image is up to date for {ref.familiar()}", ref)
                return 0
            if not info.containerd_store:
                have = await engine_chain_ids(engine)
        loop = asyncio.get_running_loop()
        config_ready: asyncio.Future[Path] = loop.create_future()
        skip: set[int] = set()
        # The config names the layers' chains; only an engine holding layers needs it before the layers.
        # Otherwise it comes with them, as docker fetches it, and the first round trip is not spent alone.
        config_first = bool(have)
        if config_first:
            config_ready.set_result((await fetcher.fetch(ref.path, [plan.config]))[plan.config.digest])
            diff_ids = await _diff_ids(config_ready.result(), ref, len(plan.layers))
            skip = {i for i, chain in enumerate(chain_ids(diff_ids)) if chain in have}
        bars = progress_bars() if options.progress and not options.quiet else None
        wanted = [layer for i, layer in enumerate(plan.layers) if i not in skip]
        for i in sorted(skip):
            if not options.quiet:
                out(f"{plan.layers[i].digest.encoded[:12]}: Already exists")
        tasks: dict[Digest, TaskID] = {}

        def progress(blob: Descriptor) -> Callable[[int, str], None]:
            if bars is None or blob.digest == plan.config.digest:
                return lambda n, source: None
            if blob.digest not in tasks:
                tasks[blob.digest] = bars.add_task(blob.digest.encoded[:12], total=blob.size, source="")
            task = tasks[blob.digest]
            return lambda n, source: bars.update(task, completed=n, source=source.split("://", 1)[-1])

        ready = {layer.digest: loop.create_future() for layer in wanted}

        def complete(blob: Descriptor, path: Path) -> None:
            if blob.digest == plan.config.digest:
                if not config_ready.done():
                    config_ready.set_result(path)
                return
            ready[blob.digest].set_result(path)
            if not options.quiet and bars is None:  # with bars, the full bar says it
                out(f"{blob.digest.encoded[:12]}: Pull complete")

        async def config_bytes() -> bytes:
            return await asyncio.to_thread((await config_ready).read_bytes)

        def archive(paths: list[Path | asyncio.Future[Path] | None]) -> AsyncIterator[bytes]:
            names = [f"{layer.digest.encoded}/layer.tar" for layer in plan.layers]
            return docker_archive(
                f"{plan.config.digest.encoded}.json",
                config_bytes(),
                [tag] if tag else [],
                zip(names, paths, strict=True),
            )

        loading = None
        if engine is not None:  # streamed into the engine as the layers arrive, in order
            entries = [None if i in skip else ready[layer.digest] for i, layer in enumerate(plan.layers)]
            loading = stack.enter_context(_background(engine.load(archive(entries))))
        if bars is not None:
            bars.start()
        try:
            got = await fetcher.fetch(ref.path, wanted if config_first else [plan.config, *wanted], progress, complete)
        finally:
            if bars is not None:
                bars.stop()
        config_path = config_ready.result()
        if not config_first:
            await _diff_ids(config_path, ref, len(plan.layers))
        paths: list[Path | None] = [None if i in skip else got[layer.digest] for i, layer in enumerate(plan.layers)]
        if loading is not None:
            await loading
            status = f"Downloaded newer image for {ref.familiar()}"
        elif output is not None and output[0] == "docker-archive":
            await write_stream(archive(list(paths)), output[1])
            status = f"Saved {ref.familiar()} to {output[1]} (docker-archive)"
        else:
            assert output is not None
            blobs = {plan.config.digest: config_path} | {
                layer.digest: path for layer, path in zip(plan.layers, paths, strict=True) if path is not None
            }
            await asyncio.to_thread(write_oci_layout, output[1], plan.manifest, blobs, ref.tag)
            status = f"Saved {ref.familiar()} to {output[1]} (OCI layout)"
        finish(out, options.quiet, plan.digest, status, ref)
        _summary(stats, skipped=len(skip), loaded_because=loaded_because)
        keep = frozenset({plan.config.digest, *(layer.digest for layer in plan.layers)})
        await asyncio.to_thread(cache.prune, options.cache_max, keep)
        return 0


def configured_mirrors() -> list[str]:
    """``mirrors`` of the ``[pull]`` table in dao's config file: tried after ``--mirror``, before the engine's."""
    path = config_file()
    if not path.exists():
        return []
    try:
        settings = load(PullConfig, "pull", file=path, env={}, flags={})
    except ConfigError as exc:
        raise ConfigError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
    return [m.rstrip("/") for m in settings.mirrors]


async def _diff_ids(config: Path, ref: Reference, layers: int) -> list[str]:
    """The config's layer DiffIDs, which must be one per manifest layer."""
    doc = json.loads(await asyncio.to_thread(config.read_bytes))
    diff_ids = [str(d) for d in (doc.get("rootfs") or {}).get("diff_ids") or []]
    if len(diff_ids) != layers:
        raise PullError(f"{ref.familiar()}: config lists {len(diff_ids)} layers, manifest {layers}")
    return diff_ids


async def pinned(ref: Reference, registry: RegistryClient, url: str) -> Reference:
    """``ref`` by the digest its tag has at the registry itself (``--verify-upstream``): mirrors then serve
    exactly that manifest, or nothing."""
    try:
        head = await registry.head_manifest(ref.path, ref.reference, DEFAULT_ACCEPT)
    except RegistryClientError as exc:
        raise PullError(f"--verify-upstream: cannot resolve {ref.familiar()} at {url}: {exc}") from exc
    if head.digest is None:
        raise PullError(f"--verify-upstream: {url} did not say which digest {ref.familiar()} has")
    return dataclasses.replace(ref, digest=head.digest)


@contextlib.contextmanager
def _background(work: Coroutine[Any, Any, T]) -> Iterator[asyncio.Task[T]]:
    """``work`` running beside the pull; cancelled (and its failure dropped) if the pull ends without it."""
    task = asyncio.get_running_loop().create_task(work)
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _timeout(options: PullOptions) -> aiohttp.ClientTimeout:
    """No bytes for ``stall_timeout`` seconds is a broken stream: resumed, then the source dropped."""
    return registry_timeout(10, options.stall_timeout)


async def registry_endpoint(
    ref: Reference, insecure: InsecureRegistries, session: aiohttp.ClientSession
) -> tuple[str, bool]:
    """The registry's base URL and whether to verify its certificate, as docker decides: HTTPS; for an
    insecure registry (the engine's ``insecure-registries`` and ranges, 127.0.0.0/8 by default, and
    ``--insecure-registry``) HTTPS without verification if it answers that, else plain HTTP."""
    host = ref.registry_host
    if ref.domain == DOCKER_HUB_DOMAIN or not await insecure.insecure(ref.domain):
        return f"https://{host}", True
    probe = RegistryClient(
        f"https://{host}",
        session,
        tls_verify=False,
        retry=RetryPolicy(attempts=1),
        timeout=aiohttp.ClientTimeout(total=INSECURE_PROBE_TIMEOUT),
    )
    try:
        await probe.ping()
    except RegistryClientError:
        return f"http://{host}", True
    return f"https://{host}", False


def _summary(stats: Stats, *, skipped: int, loaded_because: str = "") -> None:
    elapsed = max(time.monotonic() - stats.started, 1e-6)
    total = sum(stats.bytes_by_source.values())
    raced = f"; {stats.reissued} slow chunks raced by a faster source" if stats.reissued else ""
    raced += f"; {stats.split} running chunks split for idle connections" if stats.split else ""
    per_source = ", ".join(f"{n / 1e6:.1f} MB from {url}" for url, n in stats.bytes_by_source.items()) or "nothing"
    print(
        f"dao: {per_source}; {stats.cached_bytes / 1e6:.1f} MB from the local cache; {skipped} layers already "
        f"in the engine{raced}; {elapsed:.1f} s, {total / elapsed / 1e6:.1f} MB/s"
        + (f"; fetched and loaded by dao, so no RepoDigests ({loaded_because})" if loaded_because else ""),
        file=sys.stderr,
    )
