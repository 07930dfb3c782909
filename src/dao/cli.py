"""The ``dao`` command: one thin Typer sub-app per feature, no logic beyond argument parsing."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from dao import __version__
from dao.config import ConfigError, MirrorConfig, load

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


def fail(message: str, hint: str | None = None, code: int = 2) -> typer.Exit:
    typer.secho(f"dao: error: {message}", err=True, fg="red")
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    return typer.Exit(code)


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
    upstream_username: Annotated[
        str | None, typer.Option(help="Upstream account (raises Docker Hub's rate limit).")
    ] = None,
    access_log: Annotated[bool | None, typer.Option(help="One log line per request. [default: on]")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error. [default: info]")] = None,
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
        "upstream_username": upstream_username,
        "access_log": access_log,
        "log_level": log_level,
    }
    try:
        config = load(MirrorConfig, "mirror", file=config_file, env=os.environ, flags=flags)
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except ConfigError as exc:
        raise fail(str(exc), "see 'dao mirror serve --help'") from None
    except OSError as exc:
        raise fail(f"cannot create data directory {config.data_dir}: {exc.strerror}", code=1) from None
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from dao.mirror.app import serve  # aiohttp only when serving: keeps `dao --help` quick

    try:
        asyncio.run(serve(config))
    except ConfigError as exc:
        raise fail(str(exc), "see 'dao mirror serve --help'") from None
    except OSError as exc:
        raise fail(f"cannot listen on {config.listen}: {exc.strerror or exc}", code=1) from None


def main() -> None:
    app()
