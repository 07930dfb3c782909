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


def _open(config_file: Path | None, data_dir: Path | None, database: str | None) -> tuple[Any, Any, Any]:
    """The accounts (the accelerator's users: one identity everywhere) and the console's store, on the same
    database: the accelerator's unless ``--database`` names another."""
    from dao.console.store import Store
    from dao.mirror.users_cli import _accounts

    accounts, config = _accounts(config_file, data_dir, database)
    return accounts, Store(config.database_url), config


def _user_id(accounts: Any, user: str) -> str:
    """The ID of the one user whose ID or name is ``user``."""
    matches = [u.id for u in accounts.users() if user in (u.id, u.name)]
    if len(matches) != 1:
        raise fail(f"no single user {user!r}", "see 'dao mirror users list'; add one with 'dao mirror users add'")
    return matches[0]


@console_app.command("serve")
def console_serve(
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on.")] = "127.0.0.1:8080",
    public_url: Annotated[
        str,
        typer.Option(
            help="The console's URL as hosts reach it, for the install command. [default: the URL the page came by]"
        ),
    ] = "",
    ping_interval: Annotated[
        float, typer.Option(min=0.1, max=3600, help="Seconds between pings to each agent; 3 missed: offline.")
    ] = 10.0,
    signup: Annotated[
        bool, typer.Option("--signup/--no-signup", help="Let anyone create an account at /signup.")
    ] = True,
    accelerator_url: Annotated[
        str,
        typer.Option(
            help="The accelerator as hosts reach it, e.g. http://mirror.example:5000; a user's address is "
            "<label>.<its host>. [default: http://<mirror_domain> of the mirror's config, if set]"
        ),
    ] = "",
    secret_file: Annotated[
        Path | None,
        typer.Option(help="The console's secret (made on first start; share it between console nodes)."),
    ] = None,
    host_grace: Annotated[
        float, typer.Option(min=1, help="Seconds a host may be offline before its app replicas are placed elsewhere.")
    ] = 60.0,
    min_ready: Annotated[
        float,
        typer.Option(min=0, help="Seconds a new replica without a healthcheck must run before an old one goes."),
    ] = 5.0,
    migrate_lead: Annotated[
        float,
        typer.Option(min=0, help="Seconds before a capsule host expires that its app replicas start moving off it."),
    ] = 600.0,
    capsules_per_user: Annotated[int, typer.Option(min=0, help="Capsule hosts one user may have at once.")] = 2,
    redis: Annotated[
        str,
        typer.Option(
            metavar="URL",
            help="redis://HOST:PORT/DB: this console is one node of several behind a load balancer, on one "
            "database (PostgreSQL) and this Redis; give them all the same --secret-file.",
        ),
    ] = "",
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate (chain): serve HTTPS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """Serve the web console: pages and their JSON API for people, one WebSocket per agent
    (/api/agent/channel) on the same port. Accounts, hosts and metrics are in the accelerator's database
    (SQLite in the data dir unless --database names another)."""
    import ssl

    from aiohttp import web

    from dao.console.app import make_app

    host, port = parse_listen(listen)
    context = None
    if (tls_cert is None) != (tls_key is None):
        raise fail("give both --tls-cert and --tls-key, or neither")
    if tls_cert is not None and tls_key is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise fail(f"cannot use {tls_cert} with {tls_key}: {exc}") from None
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a socket per host: take all the system allows
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if redis:
        if not redis.startswith(("redis://", "rediss://", "unix://")):
            raise fail(f"--redis must be a redis://, rediss:// or unix:// URL, got {redis!r}")
        try:
            import redis as _redis_client  # noqa: F401 -- only whether it is installed
        except ImportError:
            raise fail("--redis needs the Redis client", "pip install 'dao[cluster]'") from None
    accounts, store, config = _open(config_file, data_dir, database)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = make_app(
        store,
        accounts,
        ping_interval=ping_interval,
        public_url=public_url,
        signup=signup,
        secret=_secret(secret_file, config),
        accelerator=_accelerator(accelerator_url, config),
        host_grace=host_grace,
        min_ready=min_ready,
        migrate_lead=migrate_lead,
        capsules_per_user=capsules_per_user,
        redis=redis,
    )
    try:
        web.run_app(
            app, host=host or None, port=port, ssl_context=context, print=None, access_log=None, shutdown_timeout=5
        )
    except OSError as exc:
        raise fail(f"cannot listen on {listen}: {exc.strerror or exc}", code=1) from None


def _secret(path: Path | None, config: Any) -> bytes:
    from dao.console.accelerator import load_secret
    from dao.errors import DaoError

    try:
        return load_secret(path or config.data_dir / "console.secret")
    except (OSError, DaoError) as exc:
        raise fail(f"cannot use the console's secret: {exc}") from None


def _accelerator(url: str, config: Any) -> Any:
    from dao.console.accelerator import Settings
    from dao.units import parse_size

    if not url and config.mirror_domain:
        url = f"http://{config.mirror_domain}"
    if url and not url.startswith(("http://", "https://")):
        raise fail(f"--accelerator-url {url!r}: give http(s)://host[:port]")
    return Settings(url.rstrip("/"), parse_size(config.default_quota))


users_app = typer.Typer(help="The console's accounts.", no_args_is_help=True, rich_markup_mode=None)
console_app.add_typer(users_app, name="users")


@users_app.command("add")
def console_users_add(
    name: Annotated[
        str, typer.Argument(help="The log-in name (an accelerator user of that ID or name, if any, gets it).")
    ],
    admin: Annotated[
        bool, typer.Option("--admin", help="An admin of the console (the first account is one anyway).")
    ] = False,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input (required).")
    ] = False,
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """Add an account that can log in to the console."""
    import sys

    from dao.console.users import AccountError, Users

    if not password_stdin:
        raise fail("give the password on standard input with --password-stdin (never on the command line)")
    password = sys.stdin.readline().rstrip("\r\n")
    accounts, store, config = _open(config_file, data_dir, database)
    users = Users(store.engine, accounts)
    try:
        user_id, issued = users.add(name, password, admin=admin or None)
    except AccountError as exc:
        raise fail(exc.message) from None
    if issued is not None:  # a new accelerator user: the console derives their address from now on
        from dao.console.accelerator import Accelerator

        Accelerator(users, _secret(None, config), _accelerator("", config)).issue(user_id)
    typer.echo(f"account {name} added (user {user_id}); its accelerator address is on the console's Accelerator page")


@console_app.command("enroll-token")
def console_enroll_token(
    user: Annotated[str, typer.Argument(help="The user (name or ID) the new host will belong to.")],
    ttl_hours: Annotated[float, typer.Option("--ttl-hours", min=0.01, help="Hours the token stays valid.")] = 24.0,
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """Print a one-time enrolment token for a new host of USER (dao agent enroll --token)."""
    accounts, store, _ = _open(config_file, data_dir, database)
    typer.echo(store.issue_token(_user_id(accounts, user), ttl_hours * 3600))


@console_app.command("api-token")
def console_api_token(
    user: Annotated[str, typer.Argument(help="The account (log-in name) the token acts as.")],
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """Print an API token for scripts and CI (dao app --token, or DAO_TOKEN); it acts as USER."""
    from dao.console.users import Users

    accounts, store, _ = _open(config_file, data_dir, database)
    users = Users(store.engine, accounts)
    user_id = users.user_of(user)
    if user_id is None:
        raise fail(f"no account {user!r}", "add one with 'dao console users add'")
    typer.echo(users.issue_api_token(user_id))


@console_app.command("hosts")
def console_hosts(
    user: Annotated[str | None, typer.Option("--user", help="Only this user's hosts (name or ID).")] = None,
    config_file: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    database: DatabaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The enrolled hosts: online or not, last seen, the latest metrics."""
    accounts, store, _ = _open(config_file, data_dir, database)
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
    _, store, _ = _open(config_file, data_dir, database)
    if not store.revoke(host):
        raise fail(f"no host {host!r}", "see 'dao console hosts'", code=1)
    typer.echo(f"host {host} revoked")
