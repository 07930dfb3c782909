"""dao's mirror as the user runs it: the real ``dao mirror serve`` command in a child process."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.services.procs import Process, free_port, http_status, wait_until

DAO = str(Path(sys.executable).with_name("dao"))
_ACCESS = re.compile(
    r'dao\.mirror\.access: \S+ "(?P<method>[A-Z]+) (?P<path>\S+)" (?P<status>\d+) (?P<bytes>\d+) cache=(?P<cache>\S+)'
)


@dataclass
class Access:
    method: str
    path: str
    status: int
    size: int
    cache: str


class Mirror:
    def __init__(
        self,
        workdir: Path,
        upstream: str,
        *,
        port: int | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.upstream = upstream
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        self.env = env
        self.log = workdir / "mirror.log"
        self.proc: Process | None = None
        self.start()

    def start(self) -> None:
        self.proc = Process(
            [
                DAO,
                "mirror",
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--upstream",
                self.upstream,
                "--data-dir",
                str(self.data_dir),
                *self.args,
            ],
            self.log,
            env=self.env,
        )
        wait_until(lambda: http_status(self.url + "/healthz") == 200, 20, "dao mirror", self.proc.proc)

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def kill(self) -> None:
        if self.proc:
            self.proc.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def accesses(self) -> list[Access]:
        """The access log, text (the default) or ``--log-format json`` lines."""
        out = self.output()
        found = [
            Access(m["method"], m["path"], int(m["status"]), int(m["bytes"]), m["cache"]) for m in _ACCESS.finditer(out)
        ]
        for line in out.splitlines():
            if line.startswith("{") and '"path"' in line:
                x = json.loads(line)
                found.append(Access(x["method"], x["path"], x["status"], x["bytes"], x["cache"]))
        return found

    def accesses_to(self, suffix: str, count: int, timeout: float = 5.0) -> list[Access]:
        """Access lines for paths ending in ``suffix``, once ``count`` are logged (written after the response)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [a for a in self.accesses() if a.path.endswith(suffix)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def committed_blobs(self) -> set[str]:
        root = self.data_dir / "blobs"
        return {f"{p.parent.parent.name}:{p.name}" for p in root.glob("*/*/*") if p.is_file()}

    def spool_files(self) -> list[Path]:
        return [p for p in (self.data_dir / "tmp").glob("*") if p.is_file()]


_BLOB_GET = re.compile(r"^BLOB GET (?P<path>\S+) (?P<status>\d+) range=(?P<range>.+)$", re.M)


class FaultProxy:
    def __init__(
        self,
        workdir: Path,
        upstream: str,
        *args: str,
        port: int | None = None,
        host: str = "127.0.0.1",
        ready: tuple[int, ...] = (200, 401),
    ) -> None:
        """``host``: the address it listens on (all: ``0.0.0.0``); ``ready``: the statuses of the upstream's
        ``/v2/`` that say it is up (a peer accelerator's port answers 404 there)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"faultproxy-{self.port}.log"  # shared by proxies that replace each other
        self.proc = Process(
            [
                sys.executable,
                str(Path(__file__).with_name("faultproxy.py")),
                "--port",
                str(self.port),
                "--upstream",
                upstream,
                "--host",
                host,
                *args,
            ],
            self.log,
        )
        wait_until(lambda: http_status(self.url + "/v2/") in ready, 15, "fault proxy", self.proc.proc)

    def blob_ranges(self, digest: str) -> list[str]:
        """The Range header ("-" for none) of every blob GET for ``digest`` the upstream answered with data."""
        text = self.log.read_text(errors="replace")
        return [
            m["range"] for m in _BLOB_GET.finditer(text) if m["path"].endswith(digest) and m["status"] in ("200", "206")
        ]

    def blob_bytes(self) -> int:
        """Body bytes of every blob response it sent: what crossed its link."""
        text = self.log.read_text(errors="replace")
        return sum(int(m[1]) for m in re.finditer(r"^BLOB SENT \S+ (\d+)$", text, re.M))

    def blob_bytes_sent(self, digest: str) -> list[int]:
        """Body bytes of each blob response for ``digest`` (written to the socket, delivered or not), in order."""
        text = self.log.read_text(errors="replace")
        return [int(m[2]) for m in re.finditer(r"^BLOB SENT (\S+) (\d+)$", text, re.M) if m[1].endswith(digest)]

    def requests(self, suffix: str = "") -> list[str]:
        """``METHOD path`` of every request that reached this port (any proxy on it), as they arrived."""
        text = self.log.read_text(errors="replace")
        return [line[4:] for line in text.splitlines() if line.startswith("REQ ") and line.endswith(suffix)]

    def stop(self) -> None:
        self.proc.kill()  # it may hold stalled requests open on purpose; nothing of it needs a clean exit

    def kill(self) -> None:
        self.proc.kill()


@contextlib.contextmanager
def ctr_pulled(containerd: str, mirror_port: int, ref: str, workdir: Path, namespace: str) -> Iterator[str]:
    """containerd's ``ctr`` pulls Docker Hub's ``ref`` through the mirror at ``mirror_port``, its
    ``hosts.toml`` mirror (in ``workdir/certs.d``); yields ``ctr images ls``, and removes the image after."""
    hosts = workdir / "certs.d" / "docker.io"
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(
        'server = "https://registry-1.docker.io"\n'
        f'[host."http://127.0.0.1:{mirror_port}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    ctr = ["ctr", "--address", containerd, "--namespace", namespace]
    full = f"docker.io/{ref}"
    try:
        subprocess.run(
            [*ctr, "images", "pull", "--hosts-dir", str(workdir / "certs.d"), full],
            check=True, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        yield subprocess.run([*ctr, "images", "ls"], check=True, capture_output=True, text=True).stdout
    finally:
        subprocess.run([*ctr, "images", "rm", full], capture_output=True, timeout=60)


def skopeo_copy(location: str, ref: str, out: Path) -> subprocess.CompletedProcess[str]:
    """skopeo copies Docker Hub's ``ref`` into ``dir:out`` through the mirror at ``location`` (host:port), as a
    registries.conf mirror (skopeo 1.9 ignores CONTAINERS_REGISTRIES_CONF: the file is passed)."""
    conf = out.with_suffix(".conf")
    conf.write_text(
        '[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n'
        f'[[registry.mirror]]\nlocation = "{location}"\ninsecure = true\n'
    )
    argv = ["skopeo", "--registries-conf", str(conf), "copy", "--retry-times", "0"]
    return subprocess.run(
        [*argv, f"docker://docker.io/{ref}", f"dir:{out}"], capture_output=True, text=True, timeout=300
    )
