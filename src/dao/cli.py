"""The ``dao`` command: one thin Typer sub-app per feature, no logic beyond argument parsing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dao import __version__
from dao.config import ConfigError, MirrorConfig, load
from dao.errors import USAGE, DaoError

app = typer.Typer(
    help="Fast, tidy Docker image distribution for slow, lossy or metered links.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text holds literal [brackets] (TOML tables, defaults)
)
mirror_app = typer.Typer(
    help="The accelerator: a Docker Hub pull-through registry mirror.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(mirror_app, name="mirror")
users_app = typer.Typer(
    help="The mirror's users: accelerator IDs, tokens and monthly quotas.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
mirror_app.add_typer(users_app, name="users")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML file with a [mirror] table.")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="The mirror's data directory.")]
DatabaseOpt = Annotated[
    str | None, typer.Option("--database", help="SQLAlchemy URL. [default: sqlite:///DATA_DIR/dao.db]")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dao {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """dao: registry mirror and tools for Docker hosts behind slow links."""


def fail(message: str, hint: str | None = None, code: int = USAGE) -> DaoError:
    """A usage error (exit 2) unless ``code`` says otherwise; ``main`` prints it."""
    return DaoError(message, hint=hint, exit_code=code)


@mirror_app.command("serve")
def mirror_serve(
    config_file: Annotated[
        Path | None, typer.Option("--config", help="TOML file; settings go in its [mirror] table.")
    ] = None,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT to listen on. [default: 127.0.0.1:5000]")] = None,
    upstream: Annotated[
        str | None,
        typer.Option(help="Registry to mirror, http(s)://host[:port]. [default: https://registry-1.docker.io]"),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Cache directory. [default: /var/lib/dao/mirror as root, else ~/.local/share/dao/mirror]"),
    ] = None,
    registry: Annotated[
        list[str] | None,
        typer.Option(
            "--registry",
            metavar="NAME=URL",
            help="NAME=URL: also mirror this registry (repeatable). Built in: docker.io (--upstream), ghcr.io, "
            "gcr.io, registry.k8s.io, k8s.gcr.io, quay.io, mcr.microsoft.com, public.ecr.aws, docker.elastic.co, "
            "nvcr.io.",
        ),
    ] = None,
    alias: Annotated[
        list[str] | None,
        typer.Option(
            "--alias",
            metavar="ALIAS=REGISTRY",
            help="ALIAS=REGISTRY: /v2/ALIAS/<repo> means REGISTRY/<repo> (repeatable).",
        ),
    ] = None,
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            metavar="HOSTNAME=REGISTRY",
            help="HOSTNAME=REGISTRY: requests sent to HOSTNAME are for REGISTRY (repeatable).",
        ),
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            metavar="GLOB",
            help="Only serve <registry>/<repository> matching one of these globs (repeatable).",
        ),
    ] = None,
    deny: Annotated[
        list[str] | None,
        typer.Option("--deny", metavar="GLOB", help="Refuse <registry>/<repository> matching this glob (repeatable)."),
    ] = None,
    manifest_ttl: Annotated[
        float | None,
        typer.Option(help="Seconds a tag's manifest is served before re-checking upstream. [default: 300]"),
    ] = None,
    manifest_timeout: Annotated[
        float | None,
        typer.Option(help="Seconds to wait for upstream manifest answers before serving stale. [default: 10]"),
    ] = None,
    manifest_swr: Annotated[
        float | None,
        typer.Option(
            help="Seconds past the TTL a tag is answered from cache at once while it is re-checked in the "
            "background; later, the client waits for the check (0 = always wait). [default: 86400]"
        ),
    ] = None,
    negative_ttl: Annotated[
        float | None, typer.Option(help="Seconds an upstream 'not found' is remembered. [default: 15]")
    ] = None,
    breaker_failures: Annotated[
        int | None,
        typer.Option(help="Upstream failures in a row after which requests fail fast or come from cache. [default: 5]"),
    ] = None,
    breaker_cooldown: Annotated[
        float | None, typer.Option(help="Seconds before the upstream is tried again after that. [default: 15]")
    ] = None,
    prefetch_children: Annotated[
        bool | None,
        typer.Option(help="Cache every platform's manifest when a client pulls a multi-platform index. [default: on]"),
    ] = None,
    fetch_connections: Annotated[
        int | None, typer.Option(help="Parallel upstream connections for one big blob. [default: 6]")
    ] = None,
    fetch_split_mib: Annotated[
        float | None, typer.Option(help="Blobs at least this many MiB are fetched as parallel ranges. [default: 8]")
    ] = None,
    max_fetches: Annotated[
        int | None, typer.Option(help="Upstream blob fetches at once; more wait, then get 429. [default: 64]")
    ] = None,
    max_fetches_per_client: Annotated[
        int | None, typer.Option(help="Of those, started by one client address. [default: 16]")
    ] = None,
    max_connections_per_client: Annotated[
        int | None, typer.Option(help="Connections one client address may hold open. [default: 64]")
    ] = None,
    header_timeout: Annotated[
        float | None, typer.Option(help="Seconds for a request's headers to arrive in full. [default: 15]")
    ] = None,
    send_timeout: Annotated[
        float | None,
        typer.Option(help="Every this many seconds a response must have sent --min-send-rate's worth. [default: 30]"),
    ] = None,
    min_send_rate: Annotated[
        str | None,
        typer.Option(help="Bytes a second a client must read, e.g. 8KiB; slower ones are cut. [default: 8KiB]"),
    ] = None,
    database: DatabaseOpt = None,
    mirror_domain: Annotated[
        str | None,
        typer.Option(help="Users reach the mirror as http://<id>.<mirror-domain> (usage counted per user)."),
    ] = None,
    anonymous: Annotated[
        bool | None, typer.Option(help="Serve requests that name no user, counted as 'anonymous'. [default: on]")
    ] = None,
    default_quota: Annotated[
        str | None, typer.Option(help="Bytes a user may pull a month, e.g. 50GiB; 0 = no limit. [default: 0]")
    ] = None,
    usage_flush: Annotated[
        float | None,
        typer.Option(help="Seconds between usage writes and re-reads of users and quotas. [default: 5]"),
    ] = None,
    cache_max: Annotated[
        str | None, typer.Option(help="Size limit of the cache, e.g. 200GiB; 0 = none. [default: 0]")
    ] = None,
    cache_min_free: Annotated[
        str | None, typer.Option(help="Free space to keep on the cache's disk, e.g. 10GiB; 0 = none. [default: 0]")
    ] = None,
    gc_interval: Annotated[
        float | None, typer.Option(help="Seconds between checks of the cache limits. [default: 60]")
    ] = None,
    upstream_username: Annotated[
        str | None, typer.Option(help="Upstream account (raises Docker Hub's rate limit).")
    ] = None,
    access_log: Annotated[bool | None, typer.Option(help="One log line per request. [default: on]")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error. [default: info]")] = None,
    log_format: Annotated[
        str | None,
        typer.Option(
            help="text, or json: one object per line (time, client, user, method, path, status, bytes, "
            "cache, duration, user agent, registry). [default: text]"
        ),
    ] = None,
) -> None:
    """Run the pull-through mirror.

    Point Docker at it with "registry-mirrors": ["http://HOST:PORT"] in daemon.json; containerd's hosts.toml
    mirrors (which add ?ns=REGISTRY) reach every registry it knows; so does a path prefix, as in
    docker pull HOST:PORT/ghcr.io/org/app:tag. Every setting can also
    come from the TOML file's [mirror] table or from DAO_MIRROR_<SETTING> environment variables (for example
    DAO_MIRROR_UPSTREAM_PASSWORD); flags win over the environment, which wins over the file.
    """
    flags = {
        "listen": listen,
        "upstream": upstream,
        "registries": registry or None,
        "aliases": alias or None,
        "hosts": host or None,
        "allow": allow or None,
        "deny": deny or None,
        "data_dir": data_dir,
        "manifest_ttl": manifest_ttl,
        "manifest_timeout": manifest_timeout,
        "manifest_swr": manifest_swr,
        "negative_ttl": negative_ttl,
        "breaker_failures": breaker_failures,
        "breaker_cooldown": breaker_cooldown,
        "prefetch_children": prefetch_children,
        "fetch_connections": fetch_connections,
        "fetch_split_mib": fetch_split_mib,
        "max_fetches": max_fetches,
        "max_fetches_per_client": max_fetches_per_client,
        "max_connections_per_client": max_connections_per_client,
        "header_timeout": header_timeout,
        "send_timeout": send_timeout,
        "min_send_rate": min_send_rate,
        "database": database,
        "mirror_domain": mirror_domain,
        "anonymous": anonymous,
        "default_quota": default_quota,
        "usage_flush": usage_flush,
        "cache_max": cache_max,
        "cache_min_free": cache_min_free,
        "gc_interval": gc_interval,
        "upstream_username": upstream_username,
        "access_log": access_log,
        "log_level": log_level,
        "log_format": log_format,
    }
    try:
        config = load(MirrorConfig, "mirror", file=config_file, env=os.environ, flags=flags)
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except ConfigError as exc:
        raise fail(str(exc), "see 'dao mirror serve --help'") from None
    except OSError as exc:
        raise fail(f"cannot create data directory {config.data_dir}: {exc.strerror}", code=1) from None
    from dao.mirror.logs import configure

    configure(config.log_level, config.log_format)
    from dao.mirror.app import serve  # aiohttp only when serving: keeps `dao --help` quick

    try:
        asyncio.run(serve(config))
    except ConfigError as exc:
        raise fail(str(exc), "see 'dao mirror serve --help'") from None
    except OSError as exc:
        raise fail(f"cannot listen on {config.listen}: {exc.strerror or exc}", code=1) from None


def _accounts(config_file: Path | None, data_dir: Path | None, database: str | None) -> tuple[Any, MirrorConfig]:
    from dao.mirror.accounts import Accounts

    try:
        config = load(
            MirrorConfig, "mirror", file=config_file, env=os.environ, flags={"data_dir": data_dir, "database": database}
        )
        if not config.database:
            config.data_dir.mkdir(parents=True, exist_ok=True)
        return Accounts(config.database_url), config
    except OSError as exc:
        raise fail(f"cannot create data directory {config.data_dir}: {exc.strerror}", code=1) from None


def _size(text: str) -> int:
    from dao.units import parse_size

    return parse_size(text)


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="Who the user is (free text; the logs name users by it).")],
    user_id: Annotated[
        str | None, typer.Option("--id", help="Public user ID, the key of their usage (a DNS label). [default: random]")
    ] = None,
    quota: Annotated[str | None, typer.Option(help="Monthly allowance, e.g. 50GiB. [default: the mirror's]")] = None,
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database: DatabaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a user; prints their ID, their token and their secret mirror address, once (dao keeps only hashes)."""

    accounts, config = _accounts(config_file, data_dir, database)
    issued = accounts.add_user(name, user_id=user_id, quota_bytes=_size(quota) if quota is not None else None)
    _print_issued(issued, config.mirror_domain, as_json)


@users_app.command("reissue")
def users_reissue(
    user_id: Annotated[str, typer.Argument(metavar="ID")],
    token: Annotated[bool, typer.Option("--token", help="A new token (the old one stops working).")] = False,
    address: Annotated[bool, typer.Option("--address", help="A new address (the old one stops working).")] = False,
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database: DatabaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """New secrets for a user (both unless --token or --address), printed once; a running mirror stops
    accepting the old ones within --usage-flush seconds."""

    accounts, config = _accounts(config_file, data_dir, database)
    both = not token and not address
    issued = accounts.reissue(user_id, token=token or both, address=address or both)
    _print_issued(issued, config.mirror_domain, as_json)


def _print_issued(issued: Any, domain: str, as_json: bool) -> None:
    address = f"http://{issued.address}.{domain}" if issued.address and domain else None
    if as_json:
        doc = {"id": issued.user.id, "name": issued.user.name, "token": issued.token, "address": address}
        if issued.address:
            doc["address_label"] = issued.address
        typer.echo(json.dumps({k: v for k, v in doc.items() if v is not None}))
        return
    typer.echo(f"id:      {issued.user.id}")
    if issued.token:
        typer.echo(f"token:   {issued.token}")
    if issued.address:
        typer.echo(f"address: {address}" if address else f"address: http://{issued.address}.<mirror-domain>")
    typer.echo("These are shown once: dao keeps only their hashes ('dao mirror users reissue ID' makes new ones).")


@users_app.command("list")
def users_list(
    config_file: ConfigOpt = None, data_dir: DataDirOpt = None, database: DatabaseOpt = None, as_json: JsonOpt = False
) -> None:
    """Every user with their quota."""
    from dao.units import format_size

    accounts, _ = _accounts(config_file, data_dir, database)
    users = accounts.users()
    if as_json:
        typer.echo(json.dumps([{"id": u.id, "name": u.name, "quota_bytes": u.quota_bytes} for u in users]))
        return
    table = Table("id", "name", "quota / month")
    for u in users:
        table.add_row(u.id, u.name, format_size(u.quota_bytes) if u.quota_bytes is not None else "default")
    Console().print(table)


@users_app.command("show")
def users_show(
    user_id: Annotated[str, typer.Argument(metavar="ID")],
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database: DatabaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One user: quota, whether they have an address, and usage by month (secrets are never shown again)."""
    from dao.units import format_size

    accounts, _ = _accounts(config_file, data_dir, database)
    user = accounts.user(user_id)
    months = accounts.usage(user_id=user_id)
    if as_json:
        doc = {"id": user.id, "name": user.name, "address": user.address is not None, "quota_bytes": user.quota_bytes}
        doc["usage"] = [{"month": m, **dataclasses.asdict(u)} for _, m, u in months]
        typer.echo(json.dumps(doc))
        return
    quota = format_size(user.quota_bytes) if user.quota_bytes is not None else "the mirror's default"
    has = "issued" if user.address else "none (dao mirror users reissue ID --address)"
    typer.echo(f"id:      {user.id}\nname:   {user.name}\naddress: {has}\nquota:   {quota} a month")
    _print_usage(months)


@users_app.command("quota")
def users_quota(
    user_id: Annotated[str, typer.Argument(metavar="ID")],
    size: Annotated[str, typer.Argument(help="Monthly allowance (50GiB, 500MB, 0 = no limit) or 'default'.")],
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """Set a user's monthly allowance; a running mirror applies it within --usage-flush seconds."""

    accounts, _ = _accounts(config_file, data_dir, database)
    accounts.set_quota(user_id, None if size == "default" else _size(size))


@users_app.command("remove")
def users_remove(
    user_id: Annotated[str, typer.Argument(metavar="ID")],
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """Remove a user (their usage history stays)."""

    accounts, _ = _accounts(config_file, data_dir, database)
    accounts.remove_user(user_id)


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
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Bring the cache within its limits now: least recently used blobs first, with the manifests that use them.

    A running mirror does the same every --gc-interval seconds; running this beside it is safe.
    """
    from dao.mirror.eviction import Collector
    from dao.units import format_size

    config = load(MirrorConfig, "mirror", file=config_file, env=os.environ, flags={"data_dir": data_dir})
    collector = Collector(
        config.data_dir,
        max_bytes=_size(max_size if max_size is not None else config.cache_max),
        min_free=_size(min_free if min_free is not None else config.cache_min_free),
    )
    if not collector.enabled:
        raise fail("no limit to enforce", "give --max-size or --min-free, or set cache_max / cache_min_free")
    if not (config.data_dir / "blobs").is_dir():
        raise fail(f"{config.data_dir} holds no mirror cache", code=1)
    plan = collector.plan()
    removed = 0 if dry_run else collector.apply(plan)
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


ENGINES = ("docker", "containerd", "podman")


@mirror_app.command("use")
def mirror_use(
    url: Annotated[str | None, typer.Argument(help="The mirror, http(s)://host[:port].")] = None,
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


@app.command("pull")
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
        typer.Option("--jobs", "-j", min=1, max=64, help="Connections at once, over all layers and sources."),
    ] = 16,
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
    """Pull an image into the local Docker engine, like docker pull, through mirrors and many connections."""
    from dao.pull.cache import BlobCache, default_cache_dir
    from dao.pull.run import PullOptions, pull

    if os.environ.get("DAO_LOG"):  # what each chunk and source did, for the curious and for bug reports
        logging.basicConfig(
            level=os.environ["DAO_LOG"].upper(), format="%(relativeCreated)7.0fms %(name)s: %(message)s"
        )
    if cache_prune:
        if image is not None:
            raise fail("--cache-prune takes no IMAGE")
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
        cache_max=_size(cache_max),
        stall_timeout=stall_timeout,
        insecure_registries=tuple(insecure_registry or ()),
    )
    try:
        code = asyncio.run(pull(options, out=lambda line: typer.echo(line)))
    except OSError as exc:
        raise fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), code=1) from None
    raise typer.Exit(code)


@app.command("clean")
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
            keep_free=_size(keep_free) if keep_free is not None else None,
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


def _print_usage(rows: list[Any]) -> None:
    from dao.units import format_size

    table = Table("month", "user", "served", "blobs", "pulls", "from cache")
    for user_id, month, u in rows:
        table.add_row(
            month, user_id, format_size(u.bytes_served), str(u.blobs_served), str(u.pulls), format_size(u.hit_bytes)
        )
    Console().print(table)


def main() -> None:
    """The CLI's one error boundary: a DaoError from any command is one line (and a hint) and its status."""
    try:
        app()
    except DaoError as exc:
        typer.secho(f"dao: error: {exc}", err=True, fg="red")
        if exc.hint:
            typer.echo(f"hint: {exc.hint}", err=True)
        raise SystemExit(exc.exit_code) from None
