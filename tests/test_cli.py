"""The ``dao`` command's top level: what every command shares (version, help, usage errors, error lines)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

from dao import __version__
from dao.cli import COMMANDS
from tests.services.mirror import DAO


def dao(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DAO, *argv], capture_output=True, text=True, timeout=60, env=env)


def test_version_help_and_usage_errors() -> None:
    assert dao("--version").stdout == f"dao {__version__}\n"
    listed = dao("--help")
    assert listed.returncode == 0 and all(f"  {name} " in listed.stdout for name in COMMANDS)
    assert "Pull an image into the local Docker engine" in dao("pull", "--help").stdout
    wrong = dao("pull", "--no-such-option", "busybox")
    assert wrong.returncode == 2 and "No such option: --no-such-option" in wrong.stderr
    assert dao("frobnicate").returncode == 2


def test_an_error_is_one_line_and_its_status_on_either_path(tmp_path: Path) -> None:
    """A plain dao pull is read before typer (dao.pull.quick), any other by typer: the same error line."""
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock", "DOCKER_CONFIG": str(tmp_path)}
    for argv in (["pull", "busybox"], ["pull", "--jobs", "4", "busybox"]):
        done = dao(*argv, env=env)
        assert done.returncode == 1
        assert done.stderr.splitlines() == [
            f"dao: error: cannot reach the Docker engine at unix://{tmp_path}/no-engine.sock: is dockerd running? "
            "([Errno 2] No such file or directory)"
        ]
    bad = dao("pull", "Not/A:Ref!", env=env)
    assert bad.returncode == 1 and bad.stderr.startswith("dao: error: invalid reference format")


def test_ctrl_c_ends_with_130_not_a_traceback(tmp_path: Path) -> None:
    """Interrupted while the engine has not answered yet (here: an engine that never does), on the path
    read before typer and on typer's."""
    with socket.socket() as engine:
        engine.bind(("127.0.0.1", 0))
        engine.listen()
        engine.settimeout(30)
        host = f"tcp://127.0.0.1:{engine.getsockname()[1]}"
        env = {**os.environ, "DOCKER_HOST": host, "DOCKER_CONFIG": str(tmp_path)}
        for argv in (["pull", "busybox"], ["pull", "--jobs", "4", "busybox"]):
            proc = subprocess.Popen([DAO, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            conn, _ = engine.accept()
            with conn:
                conn.settimeout(30)
                assert conn.recv(4096).startswith(b"GET /info ")  # asked, waiting for the answer
                proc.send_signal(signal.SIGINT)
                _, err = proc.communicate(timeout=30)
            assert proc.returncode == 130 and "Traceback" not in err, err
