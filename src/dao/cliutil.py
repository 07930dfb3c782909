"""What the feature CLIs share: the mirror's common options, ``--json``, one way to raise a usage error, and
size arguments. (``dao.cli.main`` prints every :class:`~dao.errors.DaoError`.)"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_origin, get_type_hints

import typer

from dao.config import shown_default
from dao.errors import USAGE, DaoError
from dao.units import parse_size

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML file with a [mirror] table.")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="The mirror's data directory.")]
DatabaseOpt = Annotated[
    str | None, typer.Option("--database", help="SQLAlchemy URL. [default: sqlite:///DATA_DIR/dao.db]")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ConsoleOpt = Annotated[
    str | None, typer.Option("--console", metavar="URL", help="The console. [default: $DAO_CONSOLE]")
]
TokenOpt = Annotated[str | None, typer.Option("--token", help="An API token. [default: $DAO_TOKEN]")]


def fail(message: str, hint: str | None = None, code: int = USAGE) -> DaoError:
    """A usage error (exit 2) unless ``code`` says otherwise; ``dao.cli.main`` prints it."""
    return DaoError(message, hint=hint, exit_code=code)


def size_arg(text: str) -> int:
    """A size as users write it (50GiB, 500MB); a UnitError (exit 2) otherwise."""
    return parse_size(text)


F = TypeVar("F", bound=Callable[..., Any])


def with_settings(cls: type, *, before: tuple[str, ...] = ()) -> Callable[[F], F]:
    """The command gets one option per field of the settings dataclass ``cls`` (declared with
    :func:`dao.config.setting`: name, default and help in one place) and receives what the user passed as
    ``settings``: field name -> value, None when not given, for :func:`dao.config.load`'s ``flags``.

    ``before``: the command's own parameters that come first in ``--help``; the rest follow the settings."""

    def decorate(func: F) -> F:
        hints = get_type_hints(cls)
        own = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "settings"]
        generated: list[inspect.Parameter] = []
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", False):
                continue
            kind = hints[f.name]
            repeated = get_origin(kind) in (dict, tuple, list)
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            shown = shown_default(f)
            text = f.metadata["help"] + (f" [default: {shown}]" if shown else "")
            names = (flag,) if repeated or kind is not bool else (f"{flag}/--no-{flag[2:]}",)
            option = typer.Option(*names, help=text, metavar=f.metadata.get("metavar"))
            annotation = Annotated[(list[str] if repeated else kind) | None, option]  # type: ignore[valid-type]
            generated.append(
                inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
            )
        fields = {p.name for p in generated}

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            settings: dict[str, Any] = {}
            for name in fields:
                value = kwargs.pop(name)
                settings[name] = (value or None) if isinstance(value, list) else value  # no repeats: not given
            return func(settings=settings, **kwargs)

        first = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.name in before]
        rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.name not in before]
        command.__signature__ = inspect.Signature(first + generated + rest)  # type: ignore[attr-defined]
        command.__annotations__ = {}  # typer reads the signature; the wrapped function's hints are not these
        return command  # type: ignore[return-value]

    return decorate


def console_call(console: str | None, token: str | None, method: str, path: str, body: Any = None) -> Any:
    """One call of the console's JSON API with an API token (``dao app``, ``dao capsule create``); the
    console's refusal, or the reason it cannot be reached, as a DaoError (exit 1)."""
    console = (console or os.environ.get("DAO_CONSOLE") or "").rstrip("/")
    token = token or os.environ.get("DAO_TOKEN")
    if not console:
        raise fail("which console? give --console URL (or set DAO_CONSOLE)")
    if not token:
        raise fail("give an API token: --token (or DAO_TOKEN)", "make one with 'dao console api-token NAME'")
    import urllib.error  # here: every other command starts without them
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        console + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            why = json.loads(exc.read()).get("error")
        except (ValueError, AttributeError):
            why = None
        raise fail(f"the console says: {why or exc.reason} ({exc.code})", code=1) from None
    except (urllib.error.URLError, OSError) as exc:
        raise fail(f"cannot reach the console at {console}: {getattr(exc, 'reason', exc)}", code=1) from None
