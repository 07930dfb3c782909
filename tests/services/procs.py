"""Starting and stopping the processes a test world needs: free ports, waiting until they answer, PIDs."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never one this process handed out before: until its user binds
    it, the kernel may offer the same number again (a relay once took a token server's port that way)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no fresh loopback port in 100 tries")


async def until(check: Callable[[], bool], seconds: float, what: str) -> None:
    """:func:`wait_until` for an async test: the loop goes on (the test's clients, its pollers) meanwhile."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.2)


async def until_async(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    """:func:`until` for a check that is itself a coroutine (an API call)."""
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.05)


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s")


def http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


class Process:
    """A child process with its output in a log file; stopped by its own PID only."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 -- lives as long as the process
        self.proc = subprocess.Popen(
            argv,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._out.close()

    def stop(self, timeout: float = 10) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Stoppable(Protocol):
    def stop(self) -> None: ...


@contextmanager
def stopping() -> Iterator[list[Stoppable]]:
    """A list to append every started service to; all are stopped, newest first, whatever happens."""
    started: list[Stoppable] = []
    try:
        yield started
    finally:
        for thing in reversed(started):
            try:
                thing.stop()
            except Exception as exc:
                print(f"stopping {thing}: {exc}", file=sys.stderr)
