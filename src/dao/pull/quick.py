"""``dao pull``'s plain command lines, read before typer is imported, for the engine's own pull.

Why: when the engine pulls through this host's local accelerator, dao's whole part is one request to the
engine, one to the accelerator and the pull itself, so the command's start is what dao adds to the pull
(the docker CLI starts in 10 ms). Importing typer and building its command take ~40 ms of dao's ~80.

Only the forms that pull scripts and people type are read here: one IMAGE, ``-q``/``--quiet``,
``--platform`` and ``--cache-dir`` (``--opt value`` or ``--opt=value``). Anything else (another option,
``--help``, a mistake) returns None and is typer's (:mod:`dao.pull.cli`), the one place options are
checked and explained; so is every pull the engine does not take, which typer's path decides again.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dao.pull.options import PullOptions

FLAGS = {"-q": "quiet", "--quiet": "quiet"}
VALUES = {"--platform": "platform", "--cache-dir": "cache_dir"}


def parse(argv: list[str]) -> PullOptions | None:
    """The options of ``dao pull ARGV`` when ARGV is one of the plain forms, else None."""
    image: str | None = None
    flags: dict[str, bool] = {}
    values: dict[str, str] = {}
    words = iter(argv)
    for word in words:
        name, eq, value = word.partition("=")
        if word in FLAGS:
            flags[FLAGS[word]] = True
        elif name in VALUES:
            value = value if eq else next(words, "")
            if not value or value.startswith("-"):  # missing, or an option: typer says what is wrong
                return None
            values[VALUES[name]] = value
        elif word.startswith("-") or image is not None:
            return None
        else:
            image = word
    if image is None or os.environ.get("DAO_LOG"):  # DAO_LOG: the logging set up by typer's path
        return None
    cache_dir = values.get("cache_dir")
    return PullOptions(
        image,
        platform=values.get("platform"),
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
        quiet=flags.get("quiet", False),
        progress=sys.stderr.isatty(),
    )


def engine_pull_first(argv: list[str]) -> int | None:
    """The exit status of ``dao pull ARGV`` when the engine's own pull took it; None for typer's path."""
    options = parse(argv)
    if options is None:
        return None
    from dao.pull.native import engine_path

    taken = engine_path(options, out=_echo)
    return taken if isinstance(taken, int) else None


def _echo(line: str) -> None:
    print(line, flush=True)
