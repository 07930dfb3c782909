"""What a pull shows: docker's closing lines, and the bars (one per layer) on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from dao.oci.reference import Reference

if TYPE_CHECKING:
    from rich.progress import Progress


def progress_bars() -> Progress:
    """One bar per layer: bytes, speed, time left, source; on stderr, so stdout stays docker's lines. (rich is
    imported here: a pull without bars, or one that fails early, does not pay for it.)"""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[source]}"),  # where the latest bytes came from
        console=Console(stderr=True),
        transient=True,
    )


def finish(out: Callable[[str], None], quiet: bool, digest: object, status: str, ref: Reference) -> None:
    """docker pull's last lines (``-q``: only the reference)."""
    if quiet:
        out(str(ref))
        return
    out(f"Digest: {digest}")
    out(f"Status: {status}")
    out(str(ref))


def warn(line: str) -> None:
    print(f"dao: warning: {line}", file=sys.stderr)
