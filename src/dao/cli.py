"""The ``dao`` command: the top level only composes the features' own command lines.

Each feature's command line is imported only when it is the command being run (``dao pull`` never imports
the mirror's or clean's), so start-up costs what that command uses; ``dao --help`` and a command line that
names none compose them all.
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated

import typer

from dao import __version__
from dao.errors import DaoError

# command -> (module, attribute, a sub-app or one command)
COMMANDS = {
    "mirror": ("dao.mirror.cli", "mirror_app", "group"),
    "pull": ("dao.pull.cli", "pull_command", "command"),
    "clean": ("dao.clean.cli", "clean_command", "command"),
    "console": ("dao.console.cli", "console_app", "group"),
    "agent": ("dao.agent.cli", "agent_app", "group"),
    "app": ("dao.console.app_cli", "app_app", "group"),
    "capsule": ("dao.agent.capsule_cli", "capsule_app", "group"),
}

app = typer.Typer(
    help="Fast, tidy Docker image distribution for slow, lossy or metered links.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text holds literal [brackets] (TOML tables, defaults)
)


def compose(argv: list[str]) -> typer.Typer:
    """Add the command ``argv`` names (the first word that is not an option), or all of them."""
    words = [a for a in argv if not a.startswith("-")]
    if not words and "--version" in argv and "--help" not in argv:
        return app  # nothing to compose for the version
    wanted = [words[0]] if words and words[0] in COMMANDS else list(COMMANDS)
    for name in wanted:
        module, attribute, kind = COMMANDS[name]
        thing = getattr(importlib.import_module(module), attribute)
        if kind == "group":
            app.add_typer(thing, name=name)
        else:
            app.command(name)(thing)
    return app


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


def main() -> None:
    """The CLI's one error boundary: a DaoError from any command is one line (and a hint) and its status."""
    try:
        compose(sys.argv[1:])()
    except DaoError as exc:
        typer.secho(f"dao: error: {exc}", err=True, fg="red")
        if exc.hint:
            typer.echo(f"hint: {exc.hint}", err=True)
        raise SystemExit(exc.exit_code) from None
