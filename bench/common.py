"""What the benchmarks share: their own network namespace, a work directory, the emulated link's thread.
(Stopping everything they started however they end: ``tests.services.procs.stopping``.)"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from bench.link import Link, serve

ROOT = Path(__file__).resolve().parent.parent


class LinkThread:
    """The emulated link's relays, on their own event loop thread (the rest of the script blocks freely)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def start(self, link: Link, port: int) -> None:
        asyncio.run_coroutine_threadsafe(serve(link, port), self.loop).result(10)

    def call(self, fn: Callable[[], None]) -> None:
        self.loop.call_soon_threadsafe(fn)


def isolated() -> bool:
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    return [line.split(":")[0].strip() for line in lines] == ["lo"]


def run_isolated(args: argparse.Namespace, run: Callable[[argparse.Namespace, Path], None], prefix: str) -> None:
    """Re-exec in a private network namespace (tests/services/isolated.sh) unless in one, then ``run`` in
    ``args.workdir`` (kept) or a temporary directory (removed)."""
    if not isolated():
        script = ROOT / "tests" / "services" / "isolated.sh"
        os.execv(str(script), [str(script), sys.executable, *sys.argv])
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args, args.workdir)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        run(args, Path(tmp))
