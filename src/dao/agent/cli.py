"""``dao agent``: enrol this host with a console, and run the agent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Annotated

import typer

agent_app = typer.Typer(
    help="The host's agent: one outbound channel to the dao console (metrics, containers, commands).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

ConfigFile = Annotated[
    Path | None,
    typer.Option("--config", help="The agent's identity file. [default: /etc/dao/agent.toml as root]"),
]


@agent_app.command("enroll")
def agent_enroll(
    console: Annotated[str, typer.Option("--console", metavar="URL", help="The console, http(s)://host[:port].")],
    token: Annotated[str, typer.Option("--token", help="The one-time enrolment token the console gave.")],
    name: Annotated[str | None, typer.Option(help="The host's name in the console. [default: its hostname]")] = None,
    config: ConfigFile = None,
) -> None:
    """Swap a one-time token for this host's identity (kept in --config, mode 600)."""
    from dao.agent.run import default_config, enroll

    path = config or default_config()
    identity = asyncio.run(enroll(console, token, path, name))
    typer.echo(f"enrolled as host {identity.host}; identity in {path}")


@agent_app.command("mirror")
def agent_mirror(config: ConfigFile = None) -> None:
    """Print the accelerator address the console gave this host's user at enrolment (for dao mirror use)."""
    from dao.agent.run import Identity, default_config
    from dao.cliutil import fail

    identity = Identity.load(config or default_config())
    if not identity.mirror:
        raise fail("the console gave no accelerator address at enrolment", code=1)
    typer.echo(identity.mirror)


@agent_app.command("run")
def agent_run(
    interval: Annotated[float, typer.Option(min=0.2, max=3600, help="Seconds between metrics samples.")] = 10.0,
    config: ConfigFile = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    app_network: Annotated[
        str, typer.Option(help="The Docker network the console's app replicas run on (bridge, host, none, ...).")
    ] = "bridge",
) -> None:
    """Keep this host's channel to the console open: it dials out only, and dials again when it breaks."""
    from dao.agent import operations
    from dao.agent.run import Agent, Identity, default_config

    operations.NETWORK = app_network

    path = config or default_config()
    identity = Identity.load(path)
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    agent = Agent(identity, path.parent, interval)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a foreground agent stops
        asyncio.run(agent.run())
