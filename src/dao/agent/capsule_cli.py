"""``dao capsule``: lend this machine's spare capacity as capsule hosts (``serve``), or ask the console for
one (``create``, ``ls``)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from pathlib import Path
from typing import Annotated

import typer

from dao.cliutil import ConsoleOpt, JsonOpt, TokenOpt, console_call, fail

capsule_app = typer.Typer(
    help="Capsule hosts: free Docker hosts that live a fixed time, their apps moved off before they end.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@capsule_app.command("serve")
def capsule_serve(
    console: Annotated[str | None, typer.Option("--console", metavar="URL", help="The console to lend to.")] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="An enrolment token, the first time (an admin's lends to everyone).")
    ] = None,
    ttl: Annotated[float, typer.Option(min=60, help="Seconds a capsule lives.")] = 7200.0,
    most: Annotated[int, typer.Option("--max", min=1, max=250, help="Capsules running at once, at most.")] = 4,
    state_dir: Annotated[Path, typer.Option(help="The provider's identity and its capsules' data.")] = Path(
        "/var/lib/dao/capsules"
    ),
    subnet: Annotated[str, typer.Option(help="First two octets of the capsules' /30 links (n.0/30 each).")] = "10.215",
    nat: Annotated[bool, typer.Option(help="Masquerade the capsules' traffic out of this machine.")] = True,
    capsule_console: Annotated[
        str,
        typer.Option(help="The console as a capsule reaches it; {gateway} is this machine's end of its link."),
    ] = "",
    dockerd_arg: Annotated[list[str] | None, typer.Option(help="One more argument for each capsule's dockerd.")] = None,
    agent_arg: Annotated[
        list[str] | None, typer.Option(help="One more argument for each capsule's dao agent run.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the capsule provider: one outbound channel to the console, which asks it for capsules. Each is a
    network namespace with its own dockerd and dao agent, destroyed when its time is up. Needs root."""
    from dao.agent.capsule import Provider
    from dao.agent.operations import OperationError
    from dao.agent.run import Agent, Identity, enroll

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if len(subnet.split(".")) != 2 or not all(p.isdigit() and int(p) < 256 for p in subnet.split(".")):
        raise fail("--subnet is two octets, e.g. 10.215")
    identity_file = state_dir / "provider.toml"
    provider = Provider(
        state_dir,
        ttl=ttl,
        most=most,
        subnet=subnet,
        nat=nat,
        console_url=capsule_console,
        dockerd_args=tuple(dockerd_arg or ()),
        agent_args=tuple(agent_arg or ()),
    )

    async def main() -> None:
        if not identity_file.exists():
            if not (console and token):
                raise fail("the first time, give --console URL and --token (an enrolment token from the console)")
            await enroll(console, token, identity_file, "capsule-provider")
        agent = Agent(
            Identity.load(identity_file),
            state_dir,
            10.0,
            operations=provider.operations,
            extra_facts=provider.facts,
            report_engine=False,
        )
        try:
            await provider.start()
        except OperationError as exc:
            raise fail(exc.message, code=1) from None
        # SIGTERM (systemd, a test) and Ctrl-C end the provider the same way: its capsules go with it, never
        # left running with no clock watching them.
        main_task = asyncio.current_task()
        assert main_task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
        try:
            await agent.run()
        except asyncio.CancelledError:
            pass
        finally:
            await provider.stop()

    asyncio.run(main())


@capsule_app.command("create")
def capsule_create(console: ConsoleOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Ask the console for a free capsule host: it is one of your hosts, online in seconds, until it ends."""
    made = console_call(console, token, "POST", "/api/capsules", {})
    if as_json:
        typer.echo(json.dumps(made))
        return
    left = max(made["expires_at"] - time.time(), 0)
    typer.echo(f"capsule {made['id']}: host {made['host']}, ends in {left / 60:.0f} min")


@capsule_app.command("ls")
def capsule_ls(console: ConsoleOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Your capsules of the last day, and how long each has left."""
    found = console_call(console, token, "GET", "/api/capsules")
    if as_json:
        typer.echo(json.dumps(found))
        return
    for c in found:
        left = c["expires_at"] - time.time()
        state = "ended" if c["ended"] or left <= 0 else f"ends in {left / 60:.0f} min"
        typer.echo(f"{c['id']}  host {c['host']}  {state}")
