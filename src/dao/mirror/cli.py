"""``dao mirror``: serve the accelerator, its usage and cache, and point a host's engines at it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dao.cliutil import ConfigOpt, DatabaseOpt, DataDirOpt, JsonOpt, fail, size_arg, with_settings
from dao.config import ConfigError, MirrorConfig, load
from dao.mirror.users_cli import _accounts, _print_usage, users_app
from dao.units import format_size

if TYPE_CHECKING:
    from dao.mirror.eviction import Collector, Plan

mirror_app = typer.Typer(
    help="The accelerator: a Docker Hub pull-through registry mirror.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
mirror_app.add_typer(users_app, name="users")


@mirror_app.command("serve")
@with_settings(MirrorConfig, before=("config_file",))
def mirror_serve(
    config_file: Annotated[
        Path | None, typer.Option("--config", help="TOML file; settings go in its [mirror] table.")
    ] = None,
    *,
    settings: dict[str, Any],
) -> None:
    """Run the pull-through mirror.

    Point Docker at it with "registry-mirrors": ["http://HOST:PORT"] in daemon.json; containerd's hosts.toml
    mirrors (which add ?ns=REGISTRY) reach every registry it knows; so does a path prefix, as in
    docker pull HOST:PORT/ghcr.io/org/app:tag. Every setting can also
    come from the TOML file's [mirror] table or from DAO_MIRROR_<SETTING> environment variables (for example
    DAO_MIRROR_UPSTREAM_PASSWORD); flags win over the environment, which wins over the file.
    """
    try:
        config = load(MirrorConfig, "mirror", file=config_file, env=os.environ, flags=settings)
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except ConfigError as exc:
        raise fail(str(exc), "see 'dao mirror serve --help'") from None
    except OSError as exc:
        raise fail(f"cannot create data directory {config.data_dir}: {exc.strerror}", code=1) from None
    from dao.mirror.logs import configure

    configure(config.log_level, config.log_format)
    from dao.mirror.daemon import serve  # aiohttp only when serving: keeps `dao --help` quick

    try:
        asyncio.run(serve(config))
    except ConfigError as exc:
        raise fail(str(exc), "see 'dao mirror serve --help'") from None
    except OSError as exc:
        raise fail(f"cannot listen on {config.listen}: {exc.strerror or exc}", code=1) from None


@mirror_app.command("usage")
def mirror_usage(
    user: Annotated[str | None, typer.Option("--user", help="Only this user ID.")] = None,
    month: Annotated[str | None, typer.Option("--month", help="Only this month, YYYY-MM (UTC).")] = None,
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database: DatabaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What each user pulled, month by month: bytes and blobs served, pulls, bytes from the cache."""
    if month is not None and not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", month):
        raise fail(f"--month must be YYYY-MM, got {month!r}")
    accounts, _ = _accounts(config_file, data_dir, database)
    rows = accounts.usage(user_id=user, month=month)
    if as_json:
        typer.echo(json.dumps([{"user": u, "month": m, **dataclasses.asdict(x)} for u, m, x in rows]))
        return
    _print_usage(rows)


@mirror_app.command("gc")
def mirror_gc(
    max_size: Annotated[
        str | None, typer.Option("--max-size", help="Cache size limit, e.g. 200GiB. [default: cache_max]")
    ] = None,
    min_free: Annotated[
        str | None, typer.Option("--min-free", help="Free space to keep, e.g. 10GiB. [default: cache_min_free]")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-d", help="List what would go; remove nothing.")] = False,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            metavar="s3://BUCKET[/PREFIX]",
            help="Collect the cluster's bucket, not a node's disk (--max-size bounds the bucket). [default: storage]",
        ),
    ] = None,
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Bring the cache within its limits now: least recently used blobs first, with the manifests that use them.

    A running mirror does the same every --gc-interval seconds for its own disk; running this beside it is
    safe. With --storage it works on the bucket every node shares instead, by the last uses the nodes record
    there (one object per node per --gc-interval); the nodes' disks keep their own limits.
    """
    from dao.mirror.eviction import Collector

    flags: dict[str, object] = {"data_dir": data_dir}
    if storage is not None:
        flags["storage"] = storage
    config = load(MirrorConfig, "mirror", file=config_file, env=os.environ, flags=flags)
    max_bytes = size_arg(max_size if max_size is not None else config.cache_max)
    min_free_bytes = size_arg(min_free if min_free is not None else config.cache_min_free)
    if config.storage and storage is None:
        storage = config.storage
    if not (max_bytes > 0 or (min_free_bytes > 0 and not storage)):
        raise fail("no limit to enforce", "give --max-size or --min-free, or set cache_max / cache_min_free")

    async def collect(collector: Collector) -> tuple[Plan, int]:
        plan = await collector.plan()
        return plan, 0 if dry_run else await collector.apply(plan)

    if storage:
        plan, removed = asyncio.run(_collect_bucket(dataclasses.replace(config, storage=storage), max_bytes, collect))
    else:
        from dao.mirror.storage import FilesystemBlobStore, FilesystemManifestStore, FilesystemOrigins

        if not (config.data_dir / "blobs").is_dir():
            raise fail(f"{config.data_dir} holds no mirror cache", code=1)
        root = config.data_dir
        blobs, manifests, origins = FilesystemBlobStore(root), FilesystemManifestStore(root), FilesystemOrigins(root)
        plan, removed = asyncio.run(
            collect(Collector(blobs, manifests, origins, max_bytes=max_bytes, min_free=min_free_bytes))
        )
    if as_json:
        items = [{"kind": i.kind, "digest": i.digest, "size": i.size, "reason": i.reason} for i in plan.items]
        doc = {"cache_bytes": plan.cache_bytes, "target_bytes": plan.target_bytes, "freed_bytes": plan.freed}
        typer.echo(json.dumps({**doc, "dry_run": dry_run, "removed": removed, "items": items}))
        return
    table = Table("kind", "digest", "size", "last used (UTC)", "reason")
    for i in plan.items:
        used = time.strftime("%Y-%m-%d %H:%M", time.gmtime(i.last_used))
        table.add_row(i.kind, i.digest[:19], format_size(i.size), used, i.reason)
    if plan.items:
        Console().print(table)
    verb = "would free" if dry_run else "freed"
    typer.echo(
        f"cache {format_size(plan.cache_bytes)}, limit {format_size(plan.target_bytes)}: "
        f"{verb} {format_size(plan.freed)} in {len(plan.items)} items"
    )


async def _collect_bucket(
    config: MirrorConfig, max_bytes: int, collect: Callable[[Collector], Awaitable[tuple[Plan, int]]]
) -> tuple[Plan, int]:
    from dao.mirror.eviction import Collector

    try:
        from dao.mirror.storage import bucket as s3b
        from dao.mirror.storage import bucket_gc
    except ImportError:
        raise fail("--storage s3://... needs the S3 client", "pip install 'dao[s3]'") from None
    try:
        async with s3b.bucket_of(config) as bucket:
            await bucket.check()
            collector = Collector(
                bucket_gc.BucketBlobs(bucket),
                bucket_gc.BucketManifests(bucket),
                bucket_gc.BucketOrigins(bucket),
                max_bytes=max_bytes,
            )
            return await collect(collector)
    except s3b.BucketError as exc:
        raise fail(exc.message, code=1) from None
    except s3b.FAILURES as exc:
        raise fail(f"the bucket failed a request: {exc}", "nothing more was removed; run it again", code=1) from None


ENGINES = ("docker", "containerd", "podman")


@mirror_app.command("use")
def mirror_use(
    url: Annotated[str | None, typer.Argument(help="The mirror, http(s)://host[:port].")] = None,
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help="This host's local accelerator (dao mirror serve --local, at its listen address): the engine's "
            "first mirror, and containerd's for every registry it serves.",
        ),
    ] = False,
    off: Annotated[bool, typer.Option("--off", help="Undo: take the mirror out again.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-d", help="Show the changes as diffs; write nothing.")] = False,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only", metavar="ENGINE", help="docker, containerd or podman (repeatable). [default: those found]"
        ),
    ] = None,
    registry: Annotated[
        list[str] | None,
        typer.Option("--registry", metavar="NAME", help="Registries containerd sends through the mirror. [docker.io]"),
    ] = None,
    docker_config: Annotated[Path, typer.Option(help="Docker's daemon.json.")] = Path("/etc/docker/daemon.json"),
    docker_pidfile: Annotated[Path, typer.Option(help="dockerd's pid file (for the reload).")] = Path(
        "/var/run/docker.pid"
    ),
    containerd_certs: Annotated[Path, typer.Option(help="containerd's hosts directory.")] = Path(
        "/etc/containerd/certs.d"
    ),
    registries_conf: Annotated[Path, typer.Option(help="podman/skopeo registries.conf.")] = Path(
        "/etc/containers/registries.conf"
    ),
) -> None:
    """Configure this host's Docker, containerd and podman/skopeo to pull through a mirror (or, with --off, not).

    Docker's daemon.json is merged (other settings and mirrors kept, a backup beside it) and dockerd reloaded;
    containerd gets certs.d/<registry>/hosts.toml; registries.conf a marked block. --dry-run prints the diffs.
    """
    from dao.mirror import use

    state = _state_dir() / "mirror-use.json"
    if local:
        if url is not None:
            raise fail("give a URL or --local, not both")
        url = _local_url()
        if registry is None:
            from dao.mirror.routing import PUBLIC_REGISTRIES

            registry = ["docker.io", *PUBLIC_REGISTRIES]
    if url is None and off:
        try:
            url = json.loads(state.read_text())["url"]
        except (OSError, ValueError, KeyError):
            raise fail("which mirror? give its URL", "dao mirror use --off http://MIRROR:5000") from None
    if url is None:
        raise fail("give the mirror's URL", "dao mirror use http://MIRROR:5000")
    engines = only or [e for e, _ in _installed_engines(docker_config, containerd_certs, registries_conf)]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise fail(f"unknown engine {sorted(unknown)[0]!r}; choose from {', '.join(ENGINES)}")
    url = use.check_url(url)
    changes: list[Any] = []
    if "docker" in engines:
        changes.append(use.docker_change(docker_config, url, off=off))
    if "containerd" in engines:
        changes += use.containerd_changes(containerd_certs, url, registry or ["docker.io"], off=off)
    if "podman" in engines:
        changes.append(use.registries_conf_change(registries_conf, url, off=off))
    if not engines:
        raise fail("no Docker, containerd or podman configuration found", "name one with --only", code=1)
    for change in changes:
        if dry_run:
            typer.echo(change.diff() or f"{change.path}: unchanged", nl=not change.diff())
            if change.note:
                typer.echo(f"# {change.note}")
            continue
        try:
            use.apply(change)
        except OSError as exc:
            raise fail(f"cannot write {change.path}: {exc.strerror}", "run it with sudo", code=1) from None
        status = "changed" if change.changes else "unchanged"
        typer.echo(f"{change.path}: {status}" + (f" ({change.note})" if change.note and change.changes else ""))
        if change.path == docker_config and change.changes:
            typer.echo(use.reload_docker(docker_pidfile))
    if not dry_run:
        try:
            if off:
                state.unlink(missing_ok=True)
            else:
                state.parent.mkdir(parents=True, exist_ok=True)
                state.write_text(json.dumps({"url": url}))
        except OSError:
            pass  # only a convenience for a later --off without a URL


def _local_url() -> str:
    """Where ``dao mirror serve --local`` listens (its settings from the file and environment); says so when
    nothing answers there yet (the engine falls back to the registry until it does)."""
    try:
        config = load(MirrorConfig, "mirror", file=None, env=os.environ, flags={})
    except ConfigError as exc:
        raise fail(str(exc)) from None
    host, port = config.listen_address
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    import urllib.error
    import urllib.request

    from dao.mirror.local import INFO_PATH

    try:
        with urllib.request.urlopen(url + INFO_PATH, timeout=2) as resp:
            resp.read()
    except (OSError, urllib.error.URLError):
        typer.echo(
            f"warning: no local accelerator answers at {url} yet: start it with dao mirror serve --local", err=True
        )
    return url


def _state_dir() -> Path:
    from dao.paths import data_dir

    return data_dir()


def _installed_engines(docker: Path, certs: Path, registries: Path) -> list[tuple[str, bool]]:
    found = [
        ("docker", docker.parent.is_dir()),
        ("containerd", certs.parent.is_dir()),
        ("podman", registries.parent.is_dir()),
    ]
    return [(name, present) for name, present in found if present]
