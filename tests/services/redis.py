"""A private Redis server (Debian ``redis-server``) on a loopback port, keeping nothing on disk; it can be
stopped and started again on the same port (the "Redis down" case)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from tests.services.procs import Process, free_port, wait_until


class Redis:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt install redis-server; make test does)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Process | None = None
        self.start()

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--protected-mode", "no"]  # fmt: skip
        self.proc = Process(argv, self.workdir / "redis.log")
        wait_until(self._answers, 20, "redis-server", self.proc.proc)

    def _answers(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
