"""``dao mirror users``: accelerator users, their secrets and monthly quotas."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dao.cliutil import ConfigOpt, DatabaseOpt, DataDirOpt, JsonOpt, fail, size_arg
from dao.config import MirrorConfig, load
from dao.units import format_size

users_app = typer.Typer(
    help="The mirror's users: accelerator IDs, tokens and monthly quotas.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


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
    issued = accounts.add_user(name, user_id=user_id, quota_bytes=size_arg(quota) if quota is not None else None)
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
    accounts.set_quota(user_id, None if size == "default" else size_arg(size))


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


def _print_usage(rows: list[Any]) -> None:

    table = Table("month", "user", "served", "blobs", "pulls", "from cache")
    for user_id, month, u in rows:
        table.add_row(
            month, user_id, format_size(u.bytes_served), str(u.blobs_served), str(u.pulls), format_size(u.hit_bytes)
        )
    Console().print(table)
