"""``dao agent``: enrol this host with a console, and run the agent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
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
    local_accelerator: Annotated[
        bool,
        typer.Option(
            "--local-accelerator",
            help="Also run this host's local accelerator (dao mirror serve --local), its peers the user's other "
            "hosts, as the console says (then: dao mirror use --local).",
        ),
    ] = False,
    accelerator_listen: Annotated[
        str, typer.Option(metavar="HOST:PORT", help="Where the local accelerator serves the engine.")
    ] = "127.0.0.1:5000",
    peer_port: Annotated[
        int, typer.Option(min=1, max=65535, help="The port it serves the user's other hosts on (every address).")
    ] = 5001,
    accelerator_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--accelerator-arg",
            metavar="ARG",
            help="Passed to dao mirror serve (repeatable), e.g. --accelerator-arg=--via=http://mirror.lan:5000.",
        ),
    ] = None,
) -> None:
    """Keep this host's channel to the console open: it dials out only, and dials again when it breaks."""
    from dao.agent import operations
    from dao.agent.accelerator import LocalAccelerator
    from dao.agent.run import Agent, Identity, default_config

    operations.NETWORK = app_network

    path = config or default_config()
    identity = Identity.load(path)
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    accelerator = None
    if local_accelerator:
        accelerator = LocalAccelerator(path.parent, accelerator_listen, peer_port, list(accelerator_arg or ()))
    agent = Agent(
        identity,
        path.parent,
        interval,
        extra_facts=accelerator.facts if accelerator is not None else None,
        on_peers=accelerator.peers if accelerator is not None else None,
    )

    async def main() -> None:
        watching: asyncio.Task[None] | None = None
        if accelerator is not None:  # SIGTERM, too, ends the agent through its finally: the child goes with it
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            watching = asyncio.get_running_loop().create_task(accelerator.watch())
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await agent.run()
        finally:
            if watching is not None:
                watching.cancel()

    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a foreground agent stops
            asyncio.run(main())
    finally:
        if accelerator is not None:
            accelerator.stop()
