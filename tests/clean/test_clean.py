"""``dao clean`` against a real Docker engine holding real garbage.

The host fixture builds, on its own dockerd: exited containers finished at different times, a container that
never started, dangling images (re-tagged over), one whose only user is an exited container, a dangling image
labelled dao.keep=true, anonymous volumes (one in use, two not), named volumes, networks in and out of use, a
running container whose image, volumes and network must survive, a broken image (its layer directory deleted
while the engine was down) and the layers of an image whose metadata never got written (what an engine killed
mid-pull leaves: layers no image references).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.services import garbage
from tests.services.dockerd import Dockerd
from tests.services.mirror import DAO
from tests.services.procs import free_port


@dataclass
class Host:
    engine: Dockerd
    ids: dict[str, str] = field(default_factory=dict)  # what the fixture made: name -> id
    ghost_chains: list[str] = field(default_factory=list)  # orphan layer chains (interrupted pull)
    ghost_dirs: list[Path] = field(default_factory=list)
    broken_dir: Path | None = None
    tcp: str = ""  # the same engine over TCP with TLS
    certs: Path | None = None

    def docker(self, *args: str) -> str:
        return self.engine.docker(*args).stdout.strip()

    def dao(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DAO, "clean", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env={"DOCKER_HOST": f"unix://{self.engine.sock}", "PATH": "/usr/bin:/bin", **(env or {})},
        )

    def dao_json(self, *args: str) -> dict:
        proc = self.dao("--json", *args)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def api(self, path: str) -> object:
        return json.loads(self._get(path)[1])

    def _get(self, path: str) -> tuple[int, bytes]:
        conn = _UnixHTTP(str(self.engine.sock))
        try:
            conn.request("GET", f"/v1.41{path}")
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def df_total(self) -> int:
        """The numbers behind ``docker system df``: image layers, containers' writable layers, volumes and the
        build cache not shared with images."""
        df = self.api("/system/df")
        assert isinstance(df, dict)
        return (
            df["LayersSize"]
            + sum(c.get("SizeRw", 0) for c in df["Containers"])
            + sum(max(v["UsageData"]["Size"], 0) for v in df["Volumes"])
            + sum(b["Size"] for b in df.get("BuildCache") or [] if not b["Shared"])
        )

    def exists(self, kind: str, id_: str) -> bool:
        path = {"container": "/containers/{}/json", "volume": "/volumes/{}", "network": "/networks/{}"}.get(kind)
        if path is None:  # images: the list, since a broken image cannot be inspected
            return any(i["Id"] == id_ for i in self.api("/images/json?all=1"))  # type: ignore[union-attr]
        return self._get(path.format(urllib.parse.quote(id_)))[0] == 200


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("docker", timeout=60)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(self.unix_path)


def _tls_certs(work: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, laid out as DOCKER_CERT_PATH wants."""
    d = work / "certs"
    d.mkdir()

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=dao-test-ca")  # fmt: skip
    for name, subject, ext in (
        ("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "/CN=client", "extendedKeyUsage=clientAuth\n"),
    ):
        (d / f"{name}.ext").write_text(ext)
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem", "-out", f"{name}.csr",
            "-subj", subject)  # fmt: skip
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
            "-out", f"{name}-cert.pem", "-days", "2", "-extfile", f"{name}.ext")  # fmt: skip
    shutil.copy(d / "client-cert.pem", d / "cert.pem")
    shutil.copy(d / "client-key.pem", d / "key.pem")
    return d


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, isolated: None) -> Iterator[Host]:
    work = tmp_path_factory.mktemp("clean")
    certs = _tls_certs(work)
    port = free_port()
    tls = ["--tlsverify", "--tlscacert", str(certs / "ca.pem"), "--tlscert", str(certs / "server-cert.pem")]
    tls += ["--tlskey", str(certs / "server-key.pem"), "-H", f"tcp://127.0.0.1:{port}"]
    engine = Dockerd(work, [], tls)
    try:
        g = garbage.make(engine, work)
        h = Host(engine, g.ids, g.ghost_chains, g.ghost_dirs, g.broken_dir, f"tcp://127.0.0.1:{port}", certs)
        yield h
    finally:
        engine.stop()


def _keys(items: list[dict]) -> set[tuple[str, str]]:
    return {(i["kind"], i["id"]) for i in items}


def _expected(h: Host) -> set[tuple[str, str]]:
    ids = h.ids
    return {
        *(("container", ids[n]) for n in ("old-exit", "new-exit", "uses-old", "with-anon", "never-started")),
        ("image", ids["app-old"]),
        ("image", ids["app2-old"]),  # its only user, uses-old, goes in the same plan
        ("image", ids["pulled-old"]),  # untagged, though a registry digest still names it
        ("broken-image", ids["broken"]),
        ("broken-image", ids["orphaned"]),
        ("layer", h.ghost_chains[0]),
        ("volume", ids["with-anon-vol"]),  # the engine (20.10) labels no volume: its container shows it anonymous
        ("network", ids["unused-net"]),
    }


def test_default_grace_spares_everything_young(host: Host) -> None:
    plan = host.dao_json("-d")
    assert plan["items"] == []
    spared = {(s["kind"], s["id"]): s["rule"] for s in plan["spared"]}
    assert "within 1h" in spared[("container", host.ids["old-exit"])]
    assert "within 1h" in spared[("layer", host.ghost_chains[0])]


def test_until_picks_containers_by_when_they_finished(host: Host) -> None:
    finished = {
        name: json.loads(host.docker("inspect", host.ids[name]))[0]["State"]["FinishedAt"]
        for name in ("old-exit", "new-exit")
    }
    plan = host.dao_json("-d", "--only", "containers", "--grace", "0", "--until", "1h")
    assert plan["items"] == [], finished
    # old-exit finished before the engine restart, new-exit at the end of the fixture
    age_new = time.time() - _unix(finished["new-exit"])
    age_old = time.time() - _unix(finished["old-exit"])
    assert age_old - age_new > 2, finished
    until = f"{int((age_old + age_new) / 2)}s"
    plan = host.dao_json("-d", "--only", "containers", "--grace", "0", "--until", until)
    names = {i["name"] for i in plan["items"]}
    assert "old-exit" in names and "new-exit" not in names, (until, finished)


def _unix(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp()


def test_dry_run_lists_exactly_the_garbage_with_evidence(host: Host) -> None:
    before = host.df_total()
    plan = host.dao_json("-d", "--grace", "0")
    assert _keys(plan["items"]) == _expected(host)
    by_key = {(i["kind"], i["id"]): i for i in plan["items"]}
    broken = by_key[("broken-image", host.ids["broken"])]
    assert any(str(host.broken_dir) in line for line in broken["evidence"]), broken
    orphaned = by_key[("broken-image", host.ids["orphaned"])]
    assert orphaned["reason"] == "broken: its parent image is gone", orphaned
    # its own COPY layer; the lost parent's COPY layer is byte-identical to the BuildKit build's, which the
    # build cache holds: it stays on disk (df counts it as build cache once no image shares it)
    assert orphaned["size"] == 300_000
    ghost = by_key[("layer", host.ghost_chains[0])]
    assert ghost["hidden"] >= 500_000 and ghost["size"] == 0
    spared = {(s["kind"], s["id"]): s["rule"] for s in plan["spared"]}
    assert spared[("image", host.ids["kept-old"])] == "labelled dao.keep=true"
    # orphaned by `docker rm` without -v on an engine that labels nothing, and a named volume whose name is 64
    # hex digits: neither shows it is anonymous, so neither goes without --volumes-named
    for vol in (host.ids["filler-vol"], host.ids["hexnamed-vol"]):
        assert spared[("volume", vol)] == "no anonymous label or container says it is anonymous"
    assert "kept-net" in {s["name"] for s in plan["spared"]}
    assert host.df_total() == before  # a dry run changes nothing
    human = host.dao("-d", "--grace", "0")
    assert human.returncode == 0
    assert "would free" in human.stdout and "with-anon" in human.stdout


KEEP_OTHERS = ("--keep", "app*", "--keep", "docker.io/library/kept:*", "--keep", "*/pulled:*")


def test_options_select_kinds_and_keep_patterns(host: Host) -> None:
    plan = host.dao_json("-d", "--grace", "0", "--only", "volumes,networks", "--volumes-named")
    assert {i["kind"] for i in plan["items"]} == {"volume", "network"}
    assert {"named-unused", host.ids["hexnamed-vol"], host.ids["filler-vol"]} <= {i["id"] for i in plan["items"]}
    assert "keepvol" not in {i["id"] for i in plan["items"]}  # the running container uses it
    plan = host.dao_json("-d", "--grace", "0", "--skip", "containers")
    kinds = {i["kind"] for i in plan["items"]}
    assert "container" not in kinds
    # without removing uses-old, its dangling image stays in use
    assert ("image", host.ids["app2-old"]) not in _keys(plan["items"])
    plan = host.dao_json("-d", "--grace", "0", "--only", "images", "--images-unused", "--keep", "unused-new:*")
    unused = [i["id"] for i in plan["items"] if i["reason"].startswith("unused")]
    # least recently used first: the re-tagged pulled:1, app:1, app2:1 and kept:1 came before unused-old:1
    assert unused[-1] == host.ids["u-old"] and len(unused) == 5, unused
    plan = host.dao_json(
        "-d", "--grace", "0", "--only", "images", "--images-unused", "--keep", "unused-new:*", *KEEP_OTHERS
    )
    unused = [i["id"] for i in plan["items"] if i["reason"].startswith("unused")]
    assert unused == [host.ids["u-old"]]
    assert any(s["rule"] == "matches --keep unused-new:*" for s in plan["spared"])
    assert host.ids["base"] not in {i["id"] for i in plan["items"]}  # the running container's


def test_keep_free_stops_once_enough_is_free(host: Host) -> None:
    free = shutil.disk_usage(host.engine.data_root).free
    dangling = sum(i["size"] for i in host.dao_json("-d", "--grace", "0", "--only", "images")["items"])
    # enough free space once the dangling images and the LRU unused image (2 MB) go, not the next one
    target = free + dangling + 1_000_000
    plan = host.dao_json(
        "-d", "--grace", "0", "--only", "images", "--images-unused", "--keep-free", str(target), *KEEP_OTHERS
    )
    unused = [i["id"] for i in plan["items"] if i["reason"].startswith("unused")]
    assert unused == [host.ids["u-old"]], plan["notes"]


def test_usage_and_engine_errors(host: Host, tmp_path: Path) -> None:
    for args in (["--only", "pictures"], ["--grace", "soon"], ["--keep-free", "1GB"], ["--plan", "/nonexistent"]):
        proc = host.dao(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("dao: error:") and "Traceback" not in proc.stderr
    assert host.dao("--plan", "p.json", "--grace", "0").returncode == 2  # a plan brings its own options
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    assert host.dao("--plan", str(bad)).returncode == 2
    proc = host.dao("-d", env={"DOCKER_HOST": f"unix://{tmp_path}/none.sock"})
    assert proc.returncode == 1 and "cannot reach the Docker engine" in proc.stderr


def test_any_engine_the_docker_cli_reaches(host: Host) -> None:
    """TCP with TLS (DOCKER_TLS_VERIFY, DOCKER_CERT_PATH), a docker context, and the oldest API dao speaks
    all see the same plan."""
    unix = host.dao_json("-d", "--grace", "0")
    tls = {"DOCKER_HOST": host.tcp, "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(host.certs)}
    proc = host.dao("-d", "--grace", "0", "--json", env=tls)
    assert proc.returncode == 0, proc.stderr
    over_tls = json.loads(proc.stdout)
    assert over_tls["host"] == host.tcp
    assert _keys(over_tls["items"]) == _keys(unix["items"])
    old = json.loads(host.dao("-d", "--grace", "0", "--json", env={"DOCKER_API_VERSION": "1.24"}).stdout)
    assert _keys(old["items"]) == _keys(unix["items"])
    # a docker context (what `docker context use` leaves), no DOCKER_HOST: TLS over TCP again
    config = host.certs.parent / "docker-config"
    meta = config / "contexts" / "meta" / hashlib.sha256(b"tls-engine").hexdigest()
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "meta.json").write_text(json.dumps({"Name": "tls-engine", "Endpoints": {"docker": {"Host": host.tcp}}}))
    (config / "config.json").write_text(json.dumps({"currentContext": "tls-engine"}))
    context = {
        "DOCKER_HOST": "",
        "DOCKER_CONFIG": str(config),
        "DOCKER_TLS_VERIFY": "1",
        "DOCKER_CERT_PATH": str(host.certs),
    }
    via_context = json.loads(host.dao("-d", "--grace", "0", "--json", env=context).stdout)
    assert via_context["host"] == host.tcp and _keys(via_context["items"]) == _keys(unix["items"])
    plain = host.dao("-d", env={"DOCKER_HOST": host.tcp})  # the engine wants TLS
    assert plain.returncode == 1 and plain.stderr.startswith("dao: error:") and "Traceback" not in plain.stderr
    wrong = host.dao("-d", env={"DOCKER_API_VERSION": "1.12"})
    assert wrong.returncode == 1 and "DOCKER_API_VERSION" in wrong.stderr


def test_permission_denied_says_what_to_do(tmp_path: Path) -> None:
    """A socket the user may not open, as the docker group's socket is to others. We are root here, so drop
    the capability that lets root open anything."""
    path = tmp_path / "docker.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
        server.listen()
        path.chmod(0)
        proc = subprocess.run(
            ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", DAO, "clean", "-d"],
            env={"DOCKER_HOST": f"unix://{path}", "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.close()
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"dao: error: permission denied on unix://{path}: run with sudo, or join the docker group (then log in again)"
    ]


def test_orphan_layers_wait_while_a_pull_is_in_progress(host: Host) -> None:
    download = host.engine.data_root / "tmp" / "GetImageBlob123456"  # what the engine writes while it pulls
    download.parent.mkdir(exist_ok=True)
    download.write_bytes(b"partial layer")
    try:
        plan = host.dao_json("-d", "--grace", "0", "--only", "broken,images", "--images-unused")
    finally:
        download.unlink()
    spared = {(s["kind"], s["id"]): s["rule"] for s in plan["spared"]}
    # the pull may be of an unused image, or be writing those layers: both wait
    assert ("layer", host.ghost_chains[0]) not in _keys(plan["items"])
    assert "a pull is in progress" in spared[("layer", host.ghost_chains[0])]
    assert "a pull is in progress" in spared[("image", host.ids["u-old"])]
    assert {("broken-image", host.ids["broken"]), ("image", host.ids["app-old"])} <= _keys(plan["items"])


def test_plan_then_apply_removes_exactly_the_plan(host: Host, tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.json"
    plan = host.dao_json("-d", "--grace", "0", "--plan-out", str(plan_file))
    listed = _keys(plan["items"])
    assert listed == _expected(host)
    assert _keys(json.loads(plan_file.read_text())["items"]) == listed
    # after the scan, a new container starts using a planned dangling image: it must keep it
    host.docker("create", "--name", "late", host.ids["app-old"], "true")
    before = host.df_total()
    result = host.dao_json("--plan", str(plan_file))
    after = host.df_total()

    removed = _keys(result["removed"])
    assert removed == listed - {("image", host.ids["app-old"])}
    assert _keys(result["skipped"]) == {("image", host.ids["app-old"])}
    assert "late" in result["skipped"][0]["detail"]
    assert result["failed"] == []
    for kind, id_ in removed:
        if kind != "layer":
            assert not host.exists(kind.replace("broken-", ""), id_), (kind, id_)
    # what docker system df counts fell by what dao said it freed
    assert abs((before - after) - result["size"]) <= 0.01 * (before - after), (before, after, result["size"])
    # the orphan layers are gone from the data root, though df never counted them
    assert result["hidden"] >= 500_000
    assert not any(p.exists() for p in host.ghost_dirs)
    # survivors: the running container, its image, volumes and network; kept things; tagged images
    for kind, id_ in (
        ("container", host.ids["running"]),
        ("image", host.ids["base"]),
        ("image", host.ids["app-old"]),
        ("image", host.ids["kept-old"]),
        ("image", host.ids["u-old"]),
        ("volume", "keepvol"),
        ("volume", "named-unused"),
        ("volume", host.ids["hexnamed-vol"]),
        ("volume", host.ids["running-vol"]),
        ("network", "keepnet"),
        ("network", "kept-net"),
    ):
        assert host.exists(kind, id_), (kind, id_)
    assert host.docker("inspect", "-f", "{{.State.Running}}", "running") == "true"

    # a dry run and a real run with the same options agree
    host.docker("rm", "late")
    host.docker("run", "--name", "one-more", "base:1", "true")
    one_more = json.loads(host.docker("inspect", "one-more"))[0]["Id"]
    dry = host.dao_json("-d", "--grace", "0")
    real = host.dao_json("--grace", "0")
    assert _keys(real["removed"]) == _keys(dry["items"]) == {("container", one_more), ("image", host.ids["app-old"])}
    assert host.dao_json("-d", "--grace", "0")["items"] == []
    assert host.dao("--grace", "0").returncode == 0


def test_build_cache_only_when_asked(host: Host) -> None:
    assert not [i for i in host.dao_json("-d", "--grace", "0")["items"] if i["kind"] == "build-cache"]
    dry = host.dao_json("-d", "--grace", "0", "--build-cache")
    cache = [i for i in dry["items"] if i["kind"] == "build-cache"]
    assert sum(i["size"] for i in cache) >= 300_000, cache  # the COPY of 300 kB
    before = host.df_total()
    real = host.dao_json("--grace", "0", "--only", "build-cache")
    after = host.df_total()
    assert _keys(real["removed"]) == _keys(cache)
    assert abs((before - after) - real["size"]) <= 0.01 * (before - after), (before, after, real["size"])
    df = host.api("/system/df")
    assert isinstance(df, dict) and [b for b in df["BuildCache"] if not b["InUse"] and not b["Shared"]] == []


def test_unused_images_really_go(host: Host) -> None:
    """Every unused tagged image, including one two repositories name (the engine wants force for that by
    ID; dao removes it by its names), and df agrees with what dao said."""
    before = host.df_total()
    result = host.dao_json("--grace", "0", "--only", "images", "--images-unused", "--keep", "unused-new:*")
    after = host.df_total()
    assert result["failed"] == [] and result["skipped"] == [], result
    removed = {i["id"] for i in result["removed"]}
    assert {host.ids["pulled-new"], host.ids["u-old"]} <= removed
    assert host.ids["base"] not in removed and host.ids["u-new"] not in removed
    for image in (host.ids["pulled-new"], host.ids["u-old"]):
        assert not host.exists("image", image)
    assert abs((before - after) - result["size"]) <= 0.01 * (before - after), (before, after, result["size"])


async def test_untagging_stops_when_a_container_starts_in_between(dockerd: Dockerd, tmp_path: Path) -> None:
    """An unused image that two repositories name is removed name by name; a container created on it after the
    first untag (the engine's real race, made to happen here) stops the removal, and the image keeps both."""
    import asyncio

    from dao.clean.plan import Item
    from dao.clean.remove import _image
    from dao.engine import Engine
    from tests.services import images

    layer = images.busybox_layer(tmp_path)
    dockerd.docker("import", str(layer.path), "twotags:a")
    dockerd.docker("tag", "twotags:a", "other/twotags:b")
    image_id = dockerd.docker("image", "inspect", "-f", "{{.Id}}", "twotags:a").stdout.strip()

    class Racing:
        """The real engine; the first untag is followed by a container starting on the image."""

        def __init__(self, engine: Engine) -> None:
            self.engine, self.raced = engine, False

        def __getattr__(self, name: str):
            return getattr(self.engine, name)

        async def remove_image(self, ref: str, **options: bool):
            answer = await self.engine.remove_image(ref, **options)
            if "twotags" in ref and not self.raced:
                self.raced = True
                await asyncio.to_thread(dockerd.docker, "create", "--name", "late-user", image_id, "true")
            return answer

    async with Engine(f"unix://{dockerd.sock}") as engine:
        await engine.negotiate()
        item = Item("image", image_id, "twotags:a", "unused: no container uses it", 0)
        detail = await _image(Racing(engine), item)  # type: ignore[arg-type]
    assert detail == "now used by container late-user (its names kept)"
    tags = json.loads(dockerd.docker("image", "inspect", image_id).stdout)[0]["RepoTags"]
    assert sorted(tags) == ["other/twotags:b", "twotags:a"]
