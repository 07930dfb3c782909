"""The ``dao`` command: the top level only composes the features' own command lines."""

from __future__ import annotations

from typing import Annotated

import typer

from dao import __version__
from dao.clean.cli import clean_command
from dao.errors import DaoError
from dao.mirror.cli import mirror_app
from dao.pull.cli import pull_command

app = typer.Typer(
    help="Fast, tidy Docker image distribution for slow, lossy or metered links.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text holds literal [brackets] (TOML tables, defaults)
)
app.add_typer(mirror_app, name="mirror")
app.command("pull")(pull_command)
app.command("clean")(clean_command)


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
        app()
    except DaoError as exc:
        typer.secho(f"dao: error: {exc}", err=True, fg="red")
        if exc.hint:
            typer.echo(f"hint: {exc.hint}", err=True)
        raise SystemExit(exc.exit_code) from None
