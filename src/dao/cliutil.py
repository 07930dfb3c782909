"""What the feature CLIs share: the mirror's common options, ``--json``, one way to raise a usage error, and
size arguments. (``dao.cli.main`` prints every :class:`~dao.errors.DaoError`.)"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dao.errors import USAGE, DaoError
from dao.units import parse_size

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML file with a [mirror] table.")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="The mirror's data directory.")]
DatabaseOpt = Annotated[
    str | None, typer.Option("--database", help="SQLAlchemy URL. [default: sqlite:///DATA_DIR/dao.db]")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def fail(message: str, hint: str | None = None, code: int = USAGE) -> DaoError:
    """A usage error (exit 2) unless ``code`` says otherwise; ``dao.cli.main`` prints it."""
    return DaoError(message, hint=hint, exit_code=code)


def size_arg(text: str) -> int:
    """A size as users write it (50GiB, 500MB); a UnitError (exit 2) otherwise."""
    return parse_size(text)
