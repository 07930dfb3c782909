"""The stand-in for Docker Hub: the CNCF registry (Debian ``docker-registry``) with token auth, plus its
token server, and a small pusher that seeds it offline through the Registry API (monolithic uploads).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.services.images import Image
from tests.services.procs import Process, free_port, http_status, wait_until

SERVICE = "dao-test-registry"
ISSUER = "dao-test-issuer"
ADMIN_PASSWORD = "seed-only"
_ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) (?P<bytes>\d+|-)')


def self_signed(workdir: Path, stem: str, common_name: str, key=None, ips: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A key (RSA 2048 unless given) and a self-signed certificate for it, as ``<stem>.key``/``<stem>.crt``;
    ``ips``: addresses it is also valid for (a subjectAltName, which TLS clients check)."""
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )
    if ips:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips])
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(key, hashes.SHA256())
    key_path, cert_path = workdir / f"{stem}.key", workdir / f"{stem}.crt"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


async def serve_in_process(handler: Callable) -> tuple[web.AppRunner, str]:
    """A small scripted HTTP server on a free loopback port of this process: (runner to clean up, URL)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@dataclass
class Request:
    method: str
    path: str
    status: int
    size: int


def access_requests(log: Path, since: int = 0) -> list[Request]:
    """What a CNCF registry served, from its access log (from byte ``since`` on)."""
    with open(log, "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    out = []
    for match in _ACCESS_LINE.finditer(text):
        size = match["bytes"]
        out.append(Request(match["method"], match["path"], int(match["status"]), 0 if size == "-" else int(size)))
    return out


class Trickle:
    """``trickle.py`` in front of ``target`` (host:port): every answer reaches the client in small pieces."""

    def __init__(self, workdir: Path, target: str, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"trickle-{self.port}.log"
        self.proc = Process(
            [
                sys.executable,
                str(Path(__file__).with_name("trickle.py")),
                "--port",
                str(self.port),
                "--to",
                target,
                *args,
            ],
            self.log,
        )
        wait_until(lambda: _connects(self.port), 15, "trickle relay", self.proc.proc)

    def connections(self) -> int:
        return self.log.read_text().count("CONN\n")

    def stop(self) -> None:
        self.proc.stop()


def _connects(port: int) -> bool:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


class Upstream:
    """A running registry + token server. ``url`` is what a mirror's ``--upstream`` takes."""

    def __init__(self, workdir: Path, *, realm: str | None = None, segmented: bool = False) -> None:
        """``realm``: the token URL the registry's challenges name (default: the token server itself; a
        benchmark puts its emulated link in between). ``segmented``: the registry and its token server are
        reached through :class:`Trickle` relays (``url`` and the realm name them), so every header, token and
        manifest arrives in 100-byte pieces; ``direct_url`` skips the relay (for seeding)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.relays: list[Trickle] = []
        key, cert = self_signed(workdir, "token", "dao test token signer")
        self.token_port = free_port()
        self.token_log = workdir / "tokens.jsonl"
        self.token_log.touch()
        self.tokens = Process(
            [
                sys.executable,
                str(Path(__file__).with_name("tokenserver.py")),
                "--port",
                str(self.token_port),
                "--key",
                str(key),
                "--issuer",
                ISSUER,
                "--admin-password",
                ADMIN_PASSWORD,
                "--log",
                str(self.token_log),
            ],
            workdir / "tokenserver.log",
        )
        wait_until(
            lambda: http_status(f"http://127.0.0.1:{self.token_port}/token") == 200,
            15,
            "token server",
            self.tokens.proc,
        )
        if segmented:
            self.relays = [Trickle(workdir, f"127.0.0.1:{self.token_port}")]
            realm = f"{self.relays[0].url}/token"
        self.port = free_port()
        self.url = self.direct_url = f"http://127.0.0.1:{self.port}"
        config = workdir / "registry.yml"
        config.write_text(
            json.dumps(
                {  # YAML is a superset of JSON
                    "version": 0.1,
                    "log": {"level": "info", "accesslog": {"disabled": False}},
                    "storage": {"filesystem": {"rootdirectory": str(workdir / "storage")}, "delete": {"enabled": True}},
                    "http": {"addr": f"127.0.0.1:{self.port}"},
                    "auth": {
                        "token": {
                            "realm": realm or f"http://127.0.0.1:{self.token_port}/token",
                            "service": SERVICE,
                            "issuer": ISSUER,
                            "rootcertbundle": str(cert),
                        }
                    },
                }
            )
        )
        self.registry = Process(["docker-registry", "serve", str(config)], workdir / "registry.log")
        wait_until(lambda: http_status(self.direct_url + "/v2/") == 401, 15, "registry", self.registry.proc)
        if segmented:
            self.relays.append(Trickle(workdir, f"127.0.0.1:{self.port}"))
            self.url = self.relays[1].url

    def stop(self) -> None:
        for relay in self.relays:
            relay.stop()
        self.registry.stop()
        self.tokens.stop()

    # -- what it served ------------------------------------------------------------------------------------

    def log_offset(self) -> int:
        return self.registry.log.stat().st_size

    def requests(self, since: int = 0) -> list[Request]:
        return access_requests(self.registry.log, since)

    def blob_gets(self, since: int = 0, digest: str | None = None) -> list[Request]:
        return [
            r
            for r in self.requests(since)
            if r.method == "GET"
            and "/blobs/" in r.path
            and r.status in (200, 206)
            and (digest is None or r.path.endswith(digest))
        ]

    # -- seeding -------------------------------------------------------------------------------------------

    def push(self, repo: str, tag: str, image: Image) -> None:
        push_image(self.direct_url, repo, image, f"Bearer {self._admin_token(repo)}", reference=tag)

    def _admin_token(self, repo: str) -> str:
        creds = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
        query = urllib.parse.urlencode({"service": SERVICE, "scope": f"repository:{repo}:pull,push"})
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.token_port}/token?{query}", headers={"Authorization": f"Basic {creds}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())["token"]


def push_image(url: str, repo: str, image: Image, authorization: str, reference: str) -> None:
    """Seed ``image`` (children first) through the Registry API, monolithic uploads, with this Authorization."""
    for child in image.children:
        push_image(url, repo, child, authorization, reference=child.digest)
    for digest, path in image.blobs.items():
        _push_blob(url, repo, digest, path, authorization)
    req = urllib.request.Request(
        f"{url}/v2/{repo}/manifests/{reference}",
        data=image.manifest,
        method="PUT",
        headers={"Authorization": authorization, "Content-Type": image.media_type},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 201, resp.status


def _push_blob(url: str, repo: str, digest: str, path: Path, authorization: str) -> None:
    auth = {"Authorization": authorization}
    head = urllib.request.Request(f"{url}/v2/{repo}/blobs/{digest}", method="HEAD", headers=auth)
    try:
        with urllib.request.urlopen(head, timeout=30):
            return
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
    start = urllib.request.Request(f"{url}/v2/{repo}/blobs/uploads/", data=b"", method="POST", headers=auth)
    with urllib.request.urlopen(start, timeout=30) as resp:
        location = urllib.parse.urljoin(url, resp.headers["Location"])
    sep = "&" if "?" in location else "?"
    with open(path, "rb") as body:
        put = urllib.request.Request(
            f"{location}{sep}digest={urllib.parse.quote(digest)}",
            data=body,
            method="PUT",
            headers={**auth, "Content-Type": "application/octet-stream", "Content-Length": str(path.stat().st_size)},
        )
        with urllib.request.urlopen(put, timeout=300) as resp:
            assert resp.status == 201, resp.status


class PrivateRegistry:
    """The CNCF registry with htpasswd (Basic) auth: nothing is served without the user's password."""

    def __init__(self, workdir: Path, user: str, password: str) -> None:
        import bcrypt

        workdir.mkdir(parents=True, exist_ok=True)
        self.user, self.password = user, password
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        config = workdir / "registry.yml"
        config.write_text(
            json.dumps(
                {
                    "version": 0.1,
                    "log": {"level": "info", "accesslog": {"disabled": False}},
                    "storage": {"filesystem": {"rootdirectory": str(workdir / "storage")}},
                    "http": {"addr": f"127.0.0.1:{self.port}"},
                    "auth": {"htpasswd": {"realm": "dao-private", "path": str(htpasswd)}},
                }
            )
        )
        self.log = workdir / "registry.log"
        self.proc = Process(["docker-registry", "serve", str(config)], self.log)
        wait_until(lambda: http_status(self.url + "/v2/") == 401, 15, "private registry", self.proc.proc)

    @property
    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()

    def push(self, repo: str, tag: str, image: Image) -> None:
        push_image(self.url, repo, image, self.basic, reference=tag)

    def requests(self) -> list[Request]:
        return access_requests(self.log)

    def stop(self) -> None:
        self.proc.stop()
