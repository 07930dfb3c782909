"""``dao clean``: the command line of a clean-up."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dao.cliutil import JsonOpt, fail, size_arg


def clean_command(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", "-d", help="List what would go and the space it frees.")
    ] = False,
    plan: Annotated[
        Path | None, typer.Option("--plan", metavar="FILE", help="Apply exactly this plan (re-checking each item).")
    ] = None,
    plan_out: Annotated[
        Path | None, typer.Option("--plan-out", metavar="FILE", help="Write the plan as JSON (with -d: review it).")
    ] = None,
    as_json: JsonOpt = False,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", metavar="KIND", help="Only these kinds (repeatable or comma-separated)."),
    ] = None,
    skip: Annotated[list[str] | None, typer.Option("--skip", metavar="KIND", help="Not these kinds.")] = None,
    until: Annotated[
        str, typer.Option(metavar="DURATION", help="Containers must have finished at least this long ago.")
    ] = "0",
    grace: Annotated[
        str, typer.Option(metavar="DURATION", help="Touch nothing used or created more recently than this.")
    ] = "1h",
    images_unused: Annotated[
        bool, typer.Option("--images-unused", help="Also tagged images no container uses, least recently used first.")
    ] = False,
    keep_free: Annotated[
        str | None,
        typer.Option(metavar="SIZE", help="With --images-unused: stop once the data root's disk has this free."),
    ] = None,
    volumes_named: Annotated[
        bool, typer.Option("--volumes-named", help="Also named volumes no container uses (anonymous ones always).")
    ] = False,
    build_cache: Annotated[bool, typer.Option("--build-cache", help="Also the build cache nothing uses.")] = False,
    keep: Annotated[
        list[str] | None,
        typer.Option(
            "--keep", metavar="PATTERN", help="Never remove images matching this (repo:tag glob; repeatable)."
        ),
    ] = None,
    keep_label: Annotated[
        str, typer.Option(metavar="KEY=VALUE", help="Never remove anything carrying this label.")
    ] = "dao.keep=true",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also list what the safety rules spared.")] = False,
) -> None:
    """Remove the garbage of the local Docker host, safely; -d shows exactly what would go.

    KIND is one of: containers (exited, dead, never started), images (dangling; unused tagged ones with
    --images-unused), volumes (anonymous ones no container uses; named ones with --volumes-named), networks
    (user-defined, unused), broken (images whose layer data is gone, layers no image references), build-cache
    (with --build-cache or --only). Never touched: what a kept container uses, anything labelled KEY=VALUE,
    images matching --keep, anything younger than --grace, orphan layers while a pull is in progress.

    Exit status: 0 cleaned or nothing to do, 1 error (engine unreachable, a removal failed), 2 bad usage.
    """
    from dao.clean.plan import DEFAULT_KINDS, KINDS, Options
    from dao.clean.run import Request, clean
    from dao.units import parse_duration

    def kinds_of(values: list[str] | None) -> list[str]:
        names = [k.strip() for v in values or [] for k in v.split(",") if k.strip()]
        for name in names:
            if name not in KINDS:
                raise fail(f"unknown kind {name!r}", f"kinds: {', '.join(KINDS)}")
        return names

    chosen = kinds_of(only) or [*DEFAULT_KINDS, *(["build-cache"] if build_cache else [])]
    if build_cache and "build-cache" not in chosen:
        chosen.append("build-cache")
    chosen = [k for k in chosen if k not in kinds_of(skip)]
    if keep_free is not None and not images_unused:
        raise fail("--keep-free only limits --images-unused", "dao clean --images-unused --keep-free 20GB")
    if "=" not in keep_label:
        raise fail(f"--keep-label {keep_label!r}: give KEY=VALUE", "--keep-label dao.keep=true")
    chose = only or skip or images_unused or volumes_named or build_cache or keep or keep_free is not None
    if plan is not None and (chose or grace != "1h" or until != "0" or keep_label != "dao.keep=true"):
        raise fail("--plan applies the plan's own options; give no kind, keep, grace or until options with it")
    try:
        options = Options(
            kinds=tuple(chosen),
            grace=parse_duration(grace),
            until=parse_duration(until),
            images_unused=images_unused,
            keep_free=size_arg(keep_free) if keep_free is not None else None,
            volumes_named=volumes_named,
            keep=tuple(keep or ()),
            keep_label=keep_label,
        )
        request = Request(options, dry_run, plan, plan_out, as_json, verbose)
        console = Console(soft_wrap=as_json) if as_json or sys.stdout.isatty() else Console(width=200)
        code = asyncio.run(clean(request, console))
    except OSError as exc:
        raise fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), code=1) from None
    raise typer.Exit(code)
