"""The host's local accelerator, run by its agent (``dao agent run --local-accelerator``).

The agent starts ``dao mirror serve --local`` as a child when the console first says who the user's peers
are and which secret they share (:class:`~dao.channel.frames.Peers`, sent right after the welcome), and
keeps it running while the agent runs:

- the peers go to a file the accelerator reads again whenever it changes (no restart when hosts come and
  go); a new secret restarts it (the listener for peers must know it);
- it serves the engine on ``--accelerator-listen`` (loopback) and peers on every address at ``--peer-port``,
  which the hello names (``peer_port``) so the console can tell the other hosts;
- everything else it is given (``--accelerator-arg``: ``--via``, ``--upstream``, ``--data-dir``, ...) is
  passed on as it is.

Pointing the engine at it stays the user's one command (``dao mirror use --local``), as for any mirror.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from dao.channel.frames import Peers
from dao.paths import write_private

log = logging.getLogger("dao.agent")

STOP_GRACE = 10.0


class LocalAccelerator:
    def __init__(self, state_dir: Path, listen: str, peer_port: int, args: list[str]) -> None:
        self.state_dir, self.listen, self.peer_port, self.args = state_dir, listen, peer_port, args
        self.peers_file = state_dir / "peers.json"
        self.log = state_dir / "accelerator.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._secret: str | None = None

    def facts(self) -> dict[str, object]:
        return {"peer_port": self.peer_port}

    def peers(self, frame: Peers) -> None:
        """What the console says: the peers file first (read by a running accelerator as it changes), then a
        (re)start if the secret is new or the child is gone."""
        write_private(self.peers_file, json.dumps(frame.urls))  # whole or not at all: the accelerator reads it
        alive = self.proc is not None and self.proc.poll() is None
        if alive and frame.secret == self._secret:
            return
        self.stop()
        self._secret = frame.secret
        self._start()

    async def watch(self, every: float = 5.0) -> None:
        """Start it again when it died (a crash, the OOM killer): the engine's first mirror must answer."""
        while True:
            await asyncio.sleep(every)
            if self._secret is not None and self.proc is not None and self.proc.poll() is not None:
                log.warning("local accelerator exited with %s; starting it again", self.proc.returncode)
                self._start()

    def _start(self) -> None:
        assert self._secret is not None
        argv = [sys.executable, "-m", "dao", "mirror", "serve", "--local", "--listen", self.listen,
                "--peer-listen", f"0.0.0.0:{self.peer_port}", "--peers-file", str(self.peers_file),
                *self.args]  # fmt: skip
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "DAO_MIRROR_PEER_SECRET": self._secret},
                start_new_session=True,
            )
        log.info(
            "local accelerator started (pid %d) on %s, peers on port %d", self.proc.pid, self.listen, self.peer_port
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
