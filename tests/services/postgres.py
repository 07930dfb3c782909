"""A private PostgreSQL server (Debian ``postgresql``): its own cluster in a temp directory, loopback only,
trust auth, run as the ``postgres`` system user (the server refuses to run as root)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.services.procs import Process, free_port, wait_until


def _bin_dir() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not versions:
        raise RuntimeError("PostgreSQL is not installed (apt install postgresql)")
    return versions[-1]


class Postgres:
    def __init__(self) -> None:
        self.bin = _bin_dir()
        user = pwd.getpwnam("postgres")
        self.root = Path(tempfile.mkdtemp(prefix="dao-pg-"))
        os.chown(self.root, user.pw_uid, user.pw_gid)
        self.data = self.root / "data"
        self.port = free_port()
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres")
        self.proc = Process(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.root}",
                "-c",
                "fsync=off",
            ],
            self.root.with_name(self.root.name + ".log"),
        )
        wait_until(self._ready, 30, "postgres", self.proc.proc)

    def _as_postgres(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, text=True, timeout=120
        )

    def _ready(self) -> bool:
        probe = [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)]
        return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0

    def create_database(self, name: str) -> str:
        """A fresh database; returns its SQLAlchemy URL."""
        self._as_postgres(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self.proc.stop(30)
        shutil.rmtree(self.root, ignore_errors=True)
