"""``dao pull``: the command line of a pull."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from dao.cliutil import fail, size_arg


def pull_command(
    image: Annotated[
        str | None, typer.Argument(metavar="IMAGE[:TAG|@DIGEST]", help="What docker pull would take.")
    ] = None,
    platform: Annotated[
        str | None, typer.Option(help="os/arch[/variant] to pick from a multi-platform image. [default: the engine's]")
    ] = None,
    mirror: Annotated[
        list[str] | None,
        typer.Option("--mirror", metavar="URL", help="A mirror to try before the registry (repeatable)."),
    ] = None,
    engine_mirrors: Annotated[
        bool, typer.Option(help="Also use the engine's registry-mirrors for Docker Hub images.")
    ] = True,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            max=64,
            help="Connections at most, over all layers and sources (it starts with 16 and adds more while "
            "that makes it faster).",
        ),
    ] = 32,
    per_source: Annotated[
        int | None,
        typer.Option(min=1, max=64, help="Connections to one mirror or registry at once. [default: as -j]"),
    ] = None,
    verify_upstream: Annotated[
        bool,
        typer.Option(
            "--verify-upstream", help="Resolve the tag at the registry itself; mirrors only serve that digest."
        ),
    ] = False,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Content cache. [default: /var/cache/dao as root, else ~/.cache/dao]")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the image reference.")] = False,
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", metavar="oci:DIR|docker-archive:FILE", help="Write the image there; no engine needed."
        ),
    ] = None,
    cache_max: Annotated[
        str, typer.Option(help="Prune the content cache to this size after each pull (LRU).")
    ] = "20GiB",
    stall_timeout: Annotated[
        float, typer.Option(help="Seconds without a byte before a source's stream counts as broken.")
    ] = 15.0,
    load: Annotated[
        bool,
        typer.Option(
            "--load",
            help="Fetch the image with dao and load it into the engine, even where the engine could pull it "
            "itself through the local accelerator (dao mirror use --local); the image then has no RepoDigests.",
        ),
    ] = False,
    cache_prune: Annotated[
        bool, typer.Option("--cache-prune", help="Empty the content cache (partial downloads in use stay); no IMAGE.")
    ] = False,
    insecure_registry: Annotated[
        list[str] | None,
        typer.Option(
            "--insecure-registry",
            metavar="HOST[:PORT]|CIDR",
            help="Like daemon.json's insecure-registries: HTTPS unverified, then HTTP (repeatable; beside the "
            "engine's own, which are always honoured).",
        ),
    ] = None,
) -> None:
    """Pull an image into the local Docker engine, like docker pull, through mirrors and many connections.

    When the engine's first registry mirror is this host's local accelerator (dao mirror use --local), a
    Docker Hub image is pulled by the engine itself through it (layers unpacked as they stream, RepoDigests
    recorded); otherwise dao fetches the image and loads it, and says so.
    """
    from dao.pull.native import engine_path
    from dao.pull.options import PullOptions

    if os.environ.get("DAO_LOG"):  # what each chunk and source did, for the curious and for bug reports
        logging.basicConfig(
            level=os.environ["DAO_LOG"].upper(), format="%(relativeCreated)7.0fms %(name)s: %(message)s"
        )
    if cache_prune:
        if image is not None:
            raise fail("--cache-prune takes no IMAGE")
        from dao.pull.cache import BlobCache, default_cache_dir

        removed, freed = BlobCache(cache_dir or default_cache_dir()).prune(0)
        typer.echo(f"removed {removed} cached blobs, {freed / 1e6:.1f} MB")
        return
    if image is None:
        raise fail("give an IMAGE to pull", "dao pull busybox")
    options = PullOptions(
        image,
        platform=platform,
        mirrors=tuple(mirror or ()),
        engine_mirrors=engine_mirrors,
        jobs=jobs,
        per_source=per_source or jobs,
        verify_upstream=verify_upstream,
        cache_dir=cache_dir,
        quiet=quiet,
        output=output,
        progress=sys.stderr.isatty(),
        cache_max=size_arg(cache_max),
        stall_timeout=stall_timeout,
        insecure_registries=tuple(insecure_registry or ()),
        load=load,
    )
    try:
        taken = engine_path(options, out=typer.echo)  # the engine's own pull, without loading the rest
        if isinstance(taken, int):
            raise typer.Exit(taken)
        import asyncio

        from dao.pull.run import pull

        code = asyncio.run(pull(options, out=lambda line: typer.echo(line), not_engine=taken))
    except OSError as exc:
        raise fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), code=1) from None
    raise typer.Exit(code)
