"""A private Docker engine: its own data root, exec root and socket, no bridge, no iptables."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from tests.services.procs import Process, wait_until

DOCKER_CLI = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"


class Dockerd:
    def __init__(
        self, workdir: Path, mirrors: list[str], extra_args: list[str] | None = None, prefix: list[str] | None = None
    ) -> None:
        """``prefix``: what the engine is started under (``ip netns exec NAME``: a host of its own)."""
        self.workdir = workdir
        self.prefix = prefix or []
        self.extra_args = extra_args or []
        # unix socket paths are limited to 108 bytes; containerd's lives under the exec root
        self.exec_root = Path(tempfile.mkdtemp(prefix="dao-x", dir="/tmp"))
        self.sock = self.exec_root / "docker.sock"
        self.config = config = workdir / "daemon.json"
        config.write_text(json.dumps({"registry-mirrors": mirrors}))
        self.pidfile = self.exec_root / "docker.pid"
        self.data_root = workdir / "data"
        self._start()

    def _start(self) -> None:
        workdir, config = self.workdir, self.config
        self.proc = Process(
            [
                *self.prefix,
                "dockerd",
                "--config-file",
                str(config),
                "--data-root",
                str(workdir / "data"),
                "--exec-root",
                str(self.exec_root / "exec"),
                "-H",
                f"unix://{self.sock}",
                "--pidfile",
                str(self.pidfile),
                "--bridge",
                "none",
                "--iptables=false",
                *self.extra_args,
            ],
            workdir / "dockerd.log",
        )
        wait_until(
            lambda: self.sock.exists() and self.docker("version", check=False).returncode == 0,
            60,
            "dockerd",
            self.proc.proc,
        )

    @property
    def containerd_address(self) -> str:
        return str(self.exec_root / "exec" / "containerd" / "containerd.sock")

    def docker(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DOCKER_CLI, "-H", f"unix://{self.sock}", *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def restart(self, between: Callable[[], None]) -> None:
        """Stop the engine, run ``between`` (it may edit the data root: the engine is down), start it again."""
        self.proc.stop(60)
        between()
        self._start()

    def reset(self) -> None:
        """Remove every container and image, so the next test pulls from scratch."""
        ids = self.docker("ps", "-aq").stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, check=False)
        images = self.docker("images", "-aq").stdout.split()
        if images:
            self.docker("rmi", "-f", *set(images), check=False)

    def stop(self) -> None:
        self.reset()
        self.proc.stop(30)
        shutil.rmtree(self.exec_root, ignore_errors=True)
