#!/usr/bin/env python3
"""How long dao takes to start, next to the docker CLI: ``--version``, and ``pull`` until its first call to
the engine (the moment a pull's real work can begin).

    .venv/bin/python bench/startup.py [--runs 15]

The engine is a stand-in: a unix socket in a temporary directory that notes when a client connects and
hangs up on it, so nothing is pulled and nothing leaves the machine. Each figure is the median of
``--runs`` runs, from the process's start to its exit (``--version``) or to that connection (``pull``).
``python -X importtime -m dao pull --help`` shows where the import time goes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DAO = ROOT / ".venv" / "bin" / "dao"


class FakeEngine:
    """Accepts connections on a unix socket and records when each arrived."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.arrived = threading.Event()
        self.at = 0.0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.at = time.monotonic()
            self.arrived.set()
            conn.close()


def time_exit(argv: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30, check=False)
    return time.monotonic() - started


def time_first_call(argv: list[str], env: dict[str, str], engine: FakeEngine) -> float:
    engine.arrived.clear()
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not engine.arrived.wait(30):
            raise RuntimeError(f"{argv[0]} never called the engine")
        return engine.at - started
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    docker = shutil.which("docker", path="/usr/bin") or shutil.which("docker")
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "engine.sock"
        engine = FakeEngine(sock)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "DOCKER_HOST": f"unix://{sock}"}
        tools = {"dao": [str(DAO)]}
        if docker:
            tools["docker"] = [docker]
        rows = []
        for name, base in tools.items():
            version = [time_exit([*base, "--version"], env) for _ in range(args.runs)]
            pull = [time_first_call([*base, "pull", "busybox:latest"], env, engine) for _ in range(args.runs)]
            rows.append((name, statistics.median(version), statistics.median(pull)))
    print(f"medians of {args.runs} runs (python {sys.version.split()[0]})")
    print(f"{'tool':<8} {'--version':>12} {'pull: first engine call':>26}")
    print("-" * 48)
    for name, version, pull in rows:
        print(f"{name:<8} {version * 1000:>10.0f} ms {pull * 1000:>23.0f} ms")


if __name__ == "__main__":
    main()
