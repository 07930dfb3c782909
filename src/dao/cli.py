"""The ``dao`` command: the top level only composes the features' own command lines.

Each feature's command line is imported only when it is the command being run (``dao pull`` never imports
the mirror's or clean's), so start-up costs what that command uses; ``dao --help`` and a command line that
names none compose them all. A plain ``dao pull IMAGE`` is first offered to the engine's own pull
(:mod:`dao.pull.quick`) before typer is imported at all: on that path the command's start is what dao adds.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

from dao import __version__
from dao.errors import DaoError

if TYPE_CHECKING:
    import typer

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


def compose(argv: list[str]) -> typer.Typer:
    """The app with the command ``argv`` names (the first word that is not an option), or all of them."""
    import typer

    app = typer.Typer(
        help="Fast, tidy Docker image distribution for slow, lossy or metered links.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,  # help text holds literal [brackets] (TOML tables, defaults)
    )

    def print_version(value: bool) -> None:
        if value:
            typer.echo(f"dao {__version__}")
            raise typer.Exit()

    @app.callback()
    def main_callback(  # the option as a default, not Annotated: typer is this function's, not the module's
        version: bool = typer.Option(
            False, "--version", callback=print_version, is_eager=True, help="Print the version and exit."
        ),
    ) -> None:
        """dao: registry mirror and tools for Docker hosts behind slow links."""

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


def main() -> None:
    """The CLI's one error boundary: a DaoError from any command is one line (and a hint) and its status."""
    argv = sys.argv[1:]
    try:
        if argv[:1] == ["pull"]:
            from dao.pull.quick import engine_pull_first

            code = engine_pull_first(argv[1:])
            if code is not None:
                raise SystemExit(code)
        compose(argv)()
    except KeyboardInterrupt:  # 128 + SIGINT, as typer's path ends
        raise SystemExit(130) from None
    except DaoError as exc:
        error = f"dao: error: {exc}"
        print(f"\x1b[31m{error}\x1b[0m" if sys.stderr.isatty() else error, file=sys.stderr)  # as typer.secho
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
