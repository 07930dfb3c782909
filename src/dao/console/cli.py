"""``dao console``: serve the console, and the operator's commands (enrolment tokens, hosts)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from dao.cliutil import ConfigOpt, DatabaseOpt, DataDirOpt, JsonOpt, fail
from dao.config import parse_listen

console_app = typer.Typer(
    help="The web console for your Docker hosts: agents dial in, the console pools them.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _open(config_file: Path | None, data_dir: Path | None, database: str | None) -> tuple[Any, Any]:
    """The accounts (the accelerator's users: one identity everywhere) and the console's store, on the same
    database: the accelerator's unless ``--database`` names another."""
    from dao.console.store import Store
    from dao.mirror.users_cli import _accounts

    accounts, config = _accounts(config_file, data_dir, database)
    return accounts, Store(config.database_url)


def _user_id(accounts: Any, user: str) -> str:
    """The ID of the one user whose ID or name is ``user``."""
    matches = [u.id for u in accounts.users() if user in (u.id, u.name)]
    if len(matches) != 1:
        raise fail(f"no single user {user!r}", "see 'dao mirror users list'; add one with 'dao mirror users add'")
    return matches[0]


@console_app.command("serve")
def console_serve(
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on.")] = "127.0.0.1:8080",
    ping_interval: Annotated[
        float, typer.Option(min=0.1, max=3600, help="Seconds between pings to each agent; 3 missed: offline.")
    ] = 10.0,
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """Serve the console: agents enrol at /api/agent/enroll and keep a channel open at /api/agent/channel."""
    from aiohttp import web

    from dao.console.app import make_app

    host, port = parse_listen(listen)
    accounts, store = _open(config_file, data_dir, database)
    accounts.close()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        web.run_app(make_app(store, ping_interval), host=host or None, port=port, print=None, access_log=None)
    except OSError as exc:
        raise fail(f"cannot listen on {listen}: {exc.strerror or exc}", code=1) from None


@console_app.command("enroll-token")
def console_enroll_token(
    user: Annotated[str, typer.Argument(help="The user (name or ID) the new host will belong to.")],
    ttl_hours: Annotated[float, typer.Option("--ttl-hours", min=0.01, help="Hours the token stays valid.")] = 24.0,
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """Print a one-time enrolment token for a new host of USER (dao agent enroll --token)."""
    accounts, store = _open(config_file, data_dir, database)
    typer.echo(store.issue_token(_user_id(accounts, user), ttl_hours * 3600))


@console_app.command("hosts")
def console_hosts(
    user: Annotated[str | None, typer.Option("--user", help="Only this user's hosts (name or ID).")] = None,
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database: DatabaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The enrolled hosts: online or not, last seen, the latest metrics."""
    accounts, store = _open(config_file, data_dir, database)
    hosts = store.hosts(None if user is None else _user_id(accounts, user))
    if as_json:
        typer.echo(json.dumps(hosts))
        return
    for h in hosts:
        state = "online" if h["online"] else ("revoked" if h["revoked"] else "offline")
        cpu = f"cpu {h['metrics']['cpu']:.0f}%" if h["metrics"] else "no metrics yet"
        typer.echo(f"{h['id']}  {h['name']:<24} {h['user']:<12} {state:<8} {cpu}")


@console_app.command("revoke")
def console_revoke(
    host: Annotated[str, typer.Argument(help="The host's ID (dao console hosts).")],
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """Revoke a host: its credential stops working, and its open channel closes within one ping interval."""
    _, store = _open(config_file, data_dir, database)
    if not store.revoke(host):
        raise fail(f"no host {host!r}", "see 'dao console hosts'", code=1)
    typer.echo(f"host {host} revoked")
