"""``dao app``: deploy, list and remove apps on a console from a script or CI, with an API token
(``dao console api-token NAME``). The console does the placing; this only speaks its JSON API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dao.cliutil import ConsoleOpt, JsonOpt, TokenOpt, console_call, fail

app_app = typer.Typer(
    help="Apps (compose files) on the dao console's pool of hosts.", no_args_is_help=True, rich_markup_mode=None
)


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
    done = console_call(console, token, "PUT", f"/api/apps/{name}", {"compose": compose})
    if as_json:
        typer.echo(json.dumps(done))
        return
    for service, s in done["services"].items():
        typer.echo(f"{name}/{service}: {s['replicas']} replica(s) of {s['image']}")
    typer.echo(f"deployed {name}; 'dao app ls' shows where its replicas run")


@app_app.command("ls")
def app_ls(console: ConsoleOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Your apps, and where each replica runs (or why it is pending)."""
    apps = console_call(console, token, "GET", "/api/apps")
    if as_json:
        typer.echo(json.dumps(apps))
        return
    for a in apps:
        for service, s in a["services"].items():
            running = sum(1 for p in s["placed"] if p["state"] == "running")
            pending = f", {len(s['pending'])} pending: {s['pending'][0]['why']}" if s["pending"] else ""
            stopped = " (stopped)" if a.get("stopped") else ""
            typer.echo(f"{a['name']}/{service}  {running}/{s['replicas']} running{pending}{stopped}")


@app_app.command("scale")
def app_scale(
    name: Annotated[str, typer.Argument(help="The app.")],
    counts: Annotated[list[str], typer.Argument(metavar="SERVICE=N...", help="Replicas per service.")],
    console: ConsoleOpt = None,
    token: TokenOpt = None,
) -> None:
    """Run N replicas of a service (over the file's deploy.replicas, until the next deploy)."""
    scale = {}
    for item in counts:
        service, _, n = item.partition("=")
        if not service or not n.isdigit():
            raise fail(f"{item!r}: give SERVICE=N, e.g. web=3")
        scale[service] = int(n)
    done = console_call(console, token, "POST", f"/api/apps/{name}/scale", {"replicas": scale})
    typer.echo(", ".join(f"{name}/{k}: {s['replicas']} replica(s)" for k, s in done["services"].items()))


@app_app.command("stop")
def app_stop(
    name: Annotated[str, typer.Argument(help="The app.")], console: ConsoleOpt = None, token: TokenOpt = None
) -> None:
    """Remove every replica and keep the app (its file, scale and volumes): 'dao app start' runs it again."""
    console_call(console, token, "POST", f"/api/apps/{name}/stop", {})
    typer.echo(f"stopped {name}")


@app_app.command("start")
def app_start(
    name: Annotated[str, typer.Argument(help="The app.")], console: ConsoleOpt = None, token: TokenOpt = None
) -> None:
    """Run a stopped app again."""
    console_call(console, token, "POST", f"/api/apps/{name}/start", {})
    typer.echo(f"started {name}")


@app_app.command("rm")
def app_rm(
    name: Annotated[str, typer.Argument(help="The app.")], console: ConsoleOpt = None, token: TokenOpt = None
) -> None:
    """Delete the app: its replicas are removed from your hosts (its named volumes stay)."""
    console_call(console, token, "DELETE", f"/api/apps/{name}")
    typer.echo(f"deleted {name}")
