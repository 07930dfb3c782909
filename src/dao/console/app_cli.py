"""``dao app``: deploy, list and remove apps on a console from a script or CI, with an API token
(``dao console api-token NAME``). The console does the placing; this only speaks its JSON API."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer

from dao.cliutil import JsonOpt, fail

app_app = typer.Typer(
    help="Apps (compose files) on the dao console's pool of hosts.", no_args_is_help=True, rich_markup_mode=None
)

ConsoleOpt = Annotated[
    str | None, typer.Option("--console", metavar="URL", help="The console. [default: $DAO_CONSOLE]")
]
TokenOpt = Annotated[str | None, typer.Option("--token", help="An API token. [default: $DAO_TOKEN]")]


def _call(console: str | None, token: str | None, method: str, path: str, body: Any = None) -> Any:
    console = (console or os.environ.get("DAO_CONSOLE") or "").rstrip("/")
    token = token or os.environ.get("DAO_TOKEN")
    if not console:
        raise fail("which console? give --console URL (or set DAO_CONSOLE)")
    if not token:
        raise fail("give an API token: --token (or DAO_TOKEN)", "make one with 'dao console api-token NAME'")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        console + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            why = json.loads(exc.read()).get("error")
        except (ValueError, AttributeError):
            why = None
        raise fail(f"the console says: {why or exc.reason} ({exc.code})", code=1) from None
    except (urllib.error.URLError, OSError) as exc:
        raise fail(f"cannot reach the console at {console}: {getattr(exc, 'reason', exc)}", code=1) from None


@app_app.command("deploy")
def app_deploy(
    file: Annotated[Path, typer.Option("-f", "--file", help="The compose file.")],
    name: Annotated[str, typer.Option("--name", help="The app's name (yours to choose; a-z, 0-9, '_', '-').")],
    console: ConsoleOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create the app, or give it a new compose file; the console places its replicas on your hosts."""
    try:
        compose = file.read_text()
    except OSError as exc:
        raise fail(f"cannot read {file}: {exc.strerror or exc}") from None
    done = _call(console, token, "PUT", f"/api/apps/{name}", {"compose": compose})
    if as_json:
        typer.echo(json.dumps(done))
        return
    for service, s in done["services"].items():
        typer.echo(f"{name}/{service}: {s['replicas']} replica(s) of {s['image']}")
    typer.echo(f"deployed {name}; 'dao app ls' shows where its replicas run")


@app_app.command("ls")
def app_ls(console: ConsoleOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Your apps, and where each replica runs (or why it is pending)."""
    apps = _call(console, token, "GET", "/api/apps")
    if as_json:
        typer.echo(json.dumps(apps))
        return
    for a in apps:
        for service, s in a["services"].items():
            running = sum(1 for p in s["placed"] if p["state"] == "running")
            pending = f", {len(s['pending'])} pending: {s['pending'][0]['why']}" if s["pending"] else ""
            typer.echo(f"{a['name']}/{service}  {running}/{s['replicas']} running{pending}")


@app_app.command("rm")
def app_rm(
    name: Annotated[str, typer.Argument(help="The app.")], console: ConsoleOpt = None, token: TokenOpt = None
) -> None:
    """Delete the app: its replicas are removed from your hosts (its named volumes stay)."""
    _call(console, token, "DELETE", f"/api/apps/{name}")
    typer.echo(f"deleted {name}")
