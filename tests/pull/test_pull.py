"""``dao pull`` into a real engine, through a real mirror in front of the real registry."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import World
from tests.services.dockerd import Dockerd
from tests.services.images import Image
from tests.services.mirror import DAO, FaultProxy, Mirror
from tests.services.procs import Stoppable, free_port, stopping
from tests.services.upstream import PrivateRegistry, Upstream


@pytest.fixture
def started() -> Iterator[list[Stoppable]]:
    """What a test starts (proxies, mirrors); stopped, newest first, however the test ends."""
    with stopping() as things:
        yield things


@pytest.fixture
def engine_mirror(world: World, tmp_path: Path, docker_mirror_port: int) -> Iterator[Mirror]:
    """A mirror on the port the session's dockerd lists in registry-mirrors: dao pull finds it there."""
    m = Mirror(tmp_path / "mirror", world.upstream.url, port=docker_mirror_port)
    yield m
    m.stop()


def dao_pull(engine: Dockerd, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DAO, "pull", "--cache-dir", str(cache), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"DOCKER_HOST": f"unix://{engine.sock}", "PATH": "/usr/bin:/bin"},
    )


def blob_gets(mirror: Mirror) -> list[str]:
    return [
        a.path.split("?")[0].rsplit("/", 1)[1]
        for a in mirror.accesses()
        if "/blobs/" in a.path and a.status in (200, 206)
    ]


@pytest.mark.parametrize("ref", ["dao-test/schema2:v1", "dao-test/oci:v1", "dao-test/multi:v1", "dao-test/big:v1"])
def test_pull_then_run(world: World, dockerd: Dockerd, engine_mirror: Mirror, tmp_path: Path, ref: str) -> None:
    done = dao_pull(dockerd, tmp_path / "cache", ref)
    assert done.returncode == 0, done.stderr
    image = world.image(ref)
    target = image.children[0] if image.children else image  # linux/amd64: the engine's platform
    lines = done.stdout.splitlines()
    assert lines[0] == f"v1: Pulling from {ref.split(':')[0]}"
    assert lines[-3:] == [f"Digest: {image.digest}", f"Status: Downloaded newer image for {ref}", f"docker.io/{ref}"]
    assert sum(line.endswith(": Pull complete") for line in lines) == len(target.layer_digests())
    assert set(target.layer_digests()) <= set(blob_gets(engine_mirror))  # every layer came through the mirror
    config = next(d for d in target.blobs if d not in target.layer_digests())
    assert dockerd.docker("image", "inspect", "-f", "{{.Id}}", ref).stdout.strip() == config
    assert_runs(dockerd, ref)
    again = dao_pull(dockerd, tmp_path / "cache", ref)
    assert again.returncode == 0 and f"Status: Image is up to date for {ref}" in again.stdout


def test_layers_the_engine_has_are_not_downloaded(
    world: World, dockerd: Dockerd, engine_mirror: Mirror, tmp_path: Path
) -> None:
    assert dao_pull(dockerd, tmp_path / "c1", "dao-test/schema2:v1").returncode == 0
    before = len(blob_gets(engine_mirror))
    done = dao_pull(dockerd, tmp_path / "c2", "library/tiny:v1")  # its only layer: busybox, already there
    assert done.returncode == 0, done.stderr
    busybox = world.image("library/tiny:v1").layer_digests()[0]
    assert f"{busybox.split(':')[1][:12]}: Already exists" in done.stdout
    assert busybox not in blob_gets(engine_mirror)[before:]  # not one byte of it fetched again
    assert_runs(dockerd, "tiny:v1")


def test_clear_errors(dockerd: Dockerd, tmp_path: Path) -> None:
    bad = dao_pull(dockerd, tmp_path, "bad reference!")
    assert bad.returncode == 1 and bad.stderr.startswith("dao: error: invalid reference format")
    assert len(bad.stderr.strip().splitlines()) == 1
    gone = subprocess.run(
        [DAO, "pull", "busybox"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"DOCKER_HOST": f"unix://{tmp_path}/nope.sock", "PATH": "/usr/bin:/bin"},
    )
    assert gone.returncode == 1 and "cannot reach the Docker engine" in gone.stderr
    assert "Traceback" not in gone.stderr


def test_killed_pull_resumes_with_only_the_missing_ranges(
    world: World, dockerd: Dockerd, tmp_path: Path, started: list[Stoppable]
) -> None:
    image = world.image("dao-test/big:v1")
    big = biggest_layer(image)
    size = image.blobs[big].stat().st_size
    proxy = FaultProxy(tmp_path, world.upstream.url, "--rate", "2000000")  # 2 MB/s per connection
    cache = tmp_path / "cache"
    runs = cache / "partial" / f"{big.split(':')[1]}.runs"
    argv = [DAO, "pull", "--cache-dir", str(cache), "--mirror", proxy.url, "--no-engine-mirrors", "dao-test/big:v1"]
    env = {"DOCKER_HOST": f"unix://{dockerd.sock}", "PATH": "/usr/bin:/bin"}
    started += [proxy]
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    covered = 0
    deadline = time.monotonic() + 120
    while covered < 20_000_000 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
        with contextlib.suppress(OSError, ValueError, KeyError):  # not written yet, or mid-replace
            covered = sum(b - a for a, b in json.loads(runs.read_text())["runs"])
    first.kill()  # SIGKILL: no chance to tidy up
    first.wait(10)
    assert 20_000_000 <= covered < size
    asked_before = len(proxy.blob_ranges(big))
    proxy = replace_proxy(proxy, tmp_path, world)  # full speed now
    started.append(proxy)
    sent_before = len(proxy.blob_bytes_sent(big))
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    second = proxy.blob_ranges(big)[asked_before:]
    assert second and "-" not in second  # every request names a range: never the whole blob again
    sent = sum(proxy.blob_bytes_sent(big)[sent_before:])
    # Only the missing part crossed again, plus what sat in socket buffers when a stream was dropped.
    assert size - covered <= sent <= size - covered + 8_000_000, (sent, covered)
    assert_runs(dockerd, "dao-test/big:v1")


def biggest_layer(image: Image) -> str:
    return max(image.layer_digests(), key=lambda d: image.blobs[d].stat().st_size)


def assert_runs(dockerd: Dockerd, ref: str) -> None:
    """The pulled image is whole: the engine starts a container from it."""
    run = dockerd.docker("run", "--rm", "--network", "none", ref, "true", check=False)
    assert run.returncode == 0, run.stderr


def replace_proxy(proxy: FaultProxy, tmp_path: Path, world: World) -> FaultProxy:
    proxy.stop()
    return FaultProxy(tmp_path, world.upstream.url, port=proxy.port)


def test_a_mirror_sending_corrupt_bytes_is_dropped_and_the_pull_succeeds(
    world: World, dockerd: Dockerd, tmp_path: Path, started: list[Stoppable]
) -> None:
    liar = FaultProxy(tmp_path, world.upstream.url, "--flip-byte")  # one byte of every blob body flipped
    honest = FaultProxy(tmp_path, world.upstream.url)
    started += [honest, liar]
    cache = tmp_path / "cache"
    done = dao_pull(
        dockerd, cache, "--no-engine-mirrors", "--mirror", liar.url, "--mirror", honest.url, "dao-test/schema2:v1"
    )
    assert done.returncode == 0, done.stderr
    assert f"{liar.url} sent corrupt bytes" in done.stderr
    assert done.stderr.count("sent corrupt bytes") == 1  # dropped after the first lie
    image = world.image("dao-test/schema2:v1")
    assert set(image.layer_digests()) <= {p.rsplit("/", 1)[1] for p in honest.requests() if "/blobs/" in p}
    assert_runs(dockerd, "dao-test/schema2:v1")


@pytest.fixture(scope="module")
def private(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRegistry]:
    registry = PrivateRegistry(tmp_path_factory.mktemp("private"), "alice", "s3cret")
    try:
        registry.push("private/app", "v1", world.image("dao-test/schema2:v1"))
        yield registry
    finally:
        registry.stop()


def pull_private(
    private: PrivateRegistry,
    dockerd: Dockerd,
    tmp_path: Path,
    config: dict,
    path: str = "/usr/bin:/bin",
    *extra: str,
) -> subprocess.CompletedProcess[str]:
    docker_config = tmp_path / "docker-config"
    docker_config.mkdir(parents=True, exist_ok=True)
    (docker_config / "config.json").write_text(json.dumps(config))
    env = {"DOCKER_HOST": f"unix://{dockerd.sock}", "PATH": path, "DOCKER_CONFIG": str(docker_config)}
    return subprocess.run(
        [DAO, "pull", "--cache-dir", str(tmp_path / "cache"), *extra, f"{private.host}/private/app:v1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_private_registry_with_docker_login_credentials(
    private: PrivateRegistry, dockerd: Dockerd, tmp_path: Path
) -> None:
    auth = base64.b64encode(b"alice:s3cret").decode()
    done = pull_private(private, dockerd, tmp_path, {"auths": {private.host: {"auth": auth}}})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"{private.host}/private/app:v1"
    assert_runs(dockerd, f"{private.host}/private/app:v1")

    pinned = pull_private(
        private,
        dockerd,
        tmp_path / "pinned",
        {"auths": {private.host: {"auth": auth}}},
        "/usr/bin:/bin",
        "--verify-upstream",
    )
    assert pinned.returncode == 0, pinned.stderr

    refused = pull_private(private, dockerd, tmp_path / "none", {"auths": {}})  # no credentials: one clear line
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "401" in refused.stderr or "unauthorized" in refused.stderr.lower()


def test_private_registry_with_a_credential_helper(private: PrivateRegistry, dockerd: Dockerd, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-daotest"
    helper.write_text(
        "#!/bin/sh\n"
        f'read server; [ "$server" = "{private.host}" ] || exit 1\n'
        'echo \'{"ServerURL": "x", "Username": "alice", "Secret": "s3cret"}\'\n'
    )
    helper.chmod(0o755)
    done = pull_private(private, dockerd, tmp_path, {"credsStore": "daotest"}, path=f"{bin_dir}:/usr/bin:/bin")
    assert done.returncode == 0, done.stderr
    missing = pull_private(private, dockerd, tmp_path / "m", {"credsStore": "nosuch"})
    assert "docker-credential-nosuch is not installed; pulling anonymously" in missing.stderr
    assert missing.returncode == 1  # anonymous is not enough for this registry


def test_outputs_need_no_engine(world: World, dockerd: Dockerd, tmp_path: Path, started: list[Stoppable]) -> None:
    mirror = Mirror(tmp_path / "mirror", world.upstream.url)
    no_engine = {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock", "PATH": "/usr/bin:/bin"}
    argv = [DAO, "pull", "--cache-dir", str(tmp_path / "cache"), "--mirror", mirror.url]
    started += [mirror]
    layout = tmp_path / "layout"
    done = subprocess.run(
        [*argv, "--platform", "linux/arm64", "--output", f"oci:{layout}", "dao-test/multi:v1"],
        env=no_engine,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    arm64 = world.image("dao-test/multi:v1").children[1]
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    copied = tmp_path / "copied"
    subprocess.run(["skopeo", "copy", f"oci:{layout}:v1", f"dir:{copied}"], check=True, timeout=120)
    got = json.loads((copied / "manifest.json").read_bytes())
    want = json.loads(arm64.manifest)
    assert got["config"]["digest"] == want["config"]["digest"]  # the platform asked for, not the machine's
    assert [x["digest"] for x in got["layers"]] == [x["digest"] for x in want["layers"]]
    for digest in [want["config"]["digest"]] + [x["digest"] for x in want["layers"]]:
        assert (copied / digest.split(":")[1]).read_bytes() == arm64.blobs[digest].read_bytes()

    archive = tmp_path / "schema2.tar"
    done = subprocess.run(
        [*argv, "--output", f"docker-archive:{archive}", "dao-test/schema2:v1"],
        env=no_engine,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    dockerd.docker("load", "-i", str(archive))
    assert_runs(dockerd, "dao-test/schema2:v1")


def test_the_engine_is_found_through_a_docker_context(
    world: World, dockerd: Dockerd, engine_mirror: Mirror, tmp_path: Path
) -> None:
    config = tmp_path / "docker-config"
    meta = config / "contexts" / "meta" / hashlib.sha256(b"testengine").hexdigest()
    meta.mkdir(parents=True)
    (meta / "meta.json").write_text(
        json.dumps({"Name": "testengine", "Endpoints": {"docker": {"Host": f"unix://{dockerd.sock}"}}})
    )
    (config / "config.json").write_text(json.dumps({"currentContext": "testengine"}))
    env = {"DOCKER_CONFIG": str(config), "PATH": "/usr/bin:/bin"}  # no DOCKER_HOST
    done = subprocess.run(
        [DAO, "pull", "--cache-dir", str(tmp_path / "cache"), "library/tiny:v1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert dockerd.docker("image", "inspect", "tiny:v1", check=False).returncode == 0
    env["DOCKER_CONTEXT"] = "missing"
    gone = subprocess.run([DAO, "pull", "tiny:v1"], env=env, capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and "docker context 'missing' not found" in gone.stderr


def test_a_mirror_killed_mid_pull_hands_over_without_starting_again(
    world: World, dockerd: Dockerd, tmp_path: Path, started: list[Stoppable]
) -> None:
    image = world.image("dao-test/big:v1")
    big = biggest_layer(image)
    size = image.blobs[big].stat().st_size
    # Both slow enough (1 MB/s per connection) that the pull is still running when the first one dies.
    first = FaultProxy(tmp_path, world.upstream.url, "--rate", "1000000")
    second = FaultProxy(tmp_path, world.upstream.url, "--rate", "1000000")
    cache = tmp_path / "cache"
    runs = cache / "partial" / f"{big.split(':')[1]}.runs"
    argv = [DAO, "pull", "--cache-dir", str(cache), "--no-engine-mirrors", "--mirror", first.url]
    env = {"DOCKER_HOST": f"unix://{dockerd.sock}", "PATH": "/usr/bin:/bin"}
    started += [second, first]
    pull = subprocess.Popen(
        [*argv, "--mirror", second.url, "dao-test/big:v1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not runs.exists() and time.monotonic() < deadline and pull.poll() is None:
        time.sleep(0.05)
    time.sleep(2)  # some megabytes in
    first.kill()
    _, err = pull.communicate(timeout=300)
    assert pull.returncode == 0, err
    assert f"{first.url} failed" in err
    taken_over = second.blob_ranges(big)
    assert taken_over and "-" not in taken_over  # the second mirror only filled in what was missing
    assert sum(second.blob_bytes_sent(big)) < size
    assert_runs(dockerd, "dao-test/big:v1")


def test_the_content_cache_stays_bounded(world: World, tmp_path: Path, started: list[Stoppable]) -> None:
    mirror = Mirror(tmp_path / "mirror", world.upstream.url)
    cache = tmp_path / "cache"
    no_engine = {"DOCKER_HOST": f"unix://{tmp_path}/none.sock", "PATH": "/usr/bin:/bin"}

    def pull(ref: str, *extra: str) -> None:
        argv = [DAO, "pull", "--cache-dir", str(cache), "--mirror", mirror.url, "--cache-max", "1MB", *extra]
        out = f"docker-archive:{tmp_path / ref.replace('/', '_')}.tar"
        done = subprocess.run([*argv, "-o", out, ref], env=no_engine, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr

    def cached() -> set[str]:
        return {f"sha256:{p.name}" for p in (cache / "blobs" / "sha256").glob("*")}

    started += [mirror]
    pull("dao-test/schema2:v1")
    schema2 = set(world.image("dao-test/schema2:v1").blobs)
    assert cached() == schema2  # over the limit, but the image just pulled is kept whole
    pull("dao-test/oci:v1")
    assert cached() == set(world.image("dao-test/oci:v1").blobs)  # the older image made room
    done = subprocess.run([DAO, "pull", "--cache-prune", "--cache-dir", str(cache)], capture_output=True, text=True)
    assert done.returncode == 0 and cached() == set()


def test_a_dead_mirror_is_probed_away_and_the_live_one_serves(
    world: World, dockerd: Dockerd, engine_mirror: Mirror, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = dao_pull(dockerd, tmp_path / "cache", "--mirror", dead, "library/tiny:v1")
    assert done.returncode == 0, done.stderr
    assert f"mirror {dead} does not answer" in done.stderr
    assert time.monotonic() - started < 30  # one quick probe, not a timeout per blob
    assert any("/blobs/" in a.path for a in engine_mirror.accesses())  # the engine's mirror served it


def test_one_bad_chunk_among_several_sources_is_traced_to_its_mirror(
    world: World, dockerd: Dockerd, tmp_path: Path, started: list[Stoppable]
) -> None:
    image = world.image("dao-test/big:v1")
    big = biggest_layer(image)
    # Same speed, so both serve chunks of the big layer; the liar flips one byte of its first ranged answer.
    liar = FaultProxy(tmp_path, world.upstream.url, "--rate", "2000000", "--flip-once")
    honest = FaultProxy(tmp_path, world.upstream.url, "--rate", "2000000")
    started += [honest, liar]
    mirrors = ("--no-engine-mirrors", "--mirror", liar.url, "--mirror", honest.url)
    done = dao_pull(dockerd, tmp_path / "cache", *mirrors, "dao-test/big:v1")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "sent corrupt bytes" in line]
    assert len(lines) == 1 and lines[0].startswith(f"dao: warning: {liar.url} sent corrupt bytes for "), lines
    bad = lines[0].split(" for ", 1)[1].split()[0]  # the blob the flipped chunk belonged to
    assert [r for r in liar.blob_ranges(bad) if r != "-"] and honest.blob_ranges(bad)  # two sources, one blob
    # The honest mirror sent its own chunks and the liar's again, nothing twice: the blob was not refetched.
    assert sum(honest.blob_bytes_sent(bad)) <= image.blobs[bad].stat().st_size + 8_000_000
    assert [r for r in liar.blob_ranges(big) if r != "-"] and [r for r in honest.blob_ranges(big) if r != "-"]
    assert_runs(dockerd, "dao-test/big:v1")


def test_the_slow_last_chunks_are_raced_by_a_faster_mirror(
    world: World, dockerd: Dockerd, tmp_path: Path, started: list[Stoppable]
) -> None:
    image = world.image("dao-test/big:v1")
    big = biggest_layer(image)
    slow = FaultProxy(tmp_path, world.upstream.url, "--rate", "100000")  # 100 kB/s: a 4 MiB chunk takes 40 s
    fast = FaultProxy(tmp_path, world.upstream.url)
    started += [fast, slow]
    mirrors = ("--no-engine-mirrors", "--mirror", slow.url, "--mirror", fast.url)
    done = dao_pull(dockerd, tmp_path / "cache", *mirrors, "dao-test/big:v1")
    assert done.returncode == 0, done.stderr
    slow_ranges = [r for r in slow.blob_ranges(big) if r != "-"]
    fast_ends = {r.rsplit("-", 1)[1] for r in fast.blob_ranges(big)}
    assert slow_ranges, "the slow mirror was never given a chunk"
    # Every chunk the slow mirror was given was finished by the fast one: a range ending at the same byte.
    assert all(r.rsplit("-", 1)[1] in fast_ends for r in slow_ranges), (slow_ranges, fast.blob_ranges(big))
    asked = sum(int(b) + 1 - int(a) for a, b in (r.removeprefix("bytes=").split("-") for r in slow_ranges))
    assert sum(slow.blob_bytes_sent(big)) < asked / 2  # the races were won long before the slow ones ended
    assert "slow chunks raced" in done.stderr


def test_verify_upstream_asks_the_registry_itself(dockerd: Dockerd, engine_mirror: Mirror, tmp_path: Path) -> None:
    # Docker Hub's names point at a dead address in the test namespace: the mirror alone can answer.
    assert dao_pull(dockerd, tmp_path / "c1", "dao-test/schema2:v1").returncode == 0
    done = dao_pull(dockerd, tmp_path / "c2", "--verify-upstream", "dao-test/schema2:v1")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--verify-upstream: cannot resolve dao-test/schema2:v1 at https://registry-1.docker.io" in done.stderr


def test_a_mirror_that_ignores_range_gets_whole_blobs(
    world: World, dockerd: Dockerd, tmp_path: Path, started: list[Stoppable]
) -> None:
    image = world.image("dao-test/big:v1")
    big = biggest_layer(image)
    size = image.blobs[big].stat().st_size
    mirror = FaultProxy(tmp_path, world.upstream.url, "--no-range")  # drops Range: every answer is a 200
    started += [mirror]
    done = dao_pull(dockerd, tmp_path / "cache", "--no-engine-mirrors", "--mirror", mirror.url, "dao-test/big:v1")
    assert done.returncode == 0, done.stderr
    # The first answers show Range is ignored; from then on one stream per blob: what dao read is about the
    # image once, not once per chunk (the proxy's own count includes what it pushed into aborted sockets).
    received = float(done.stderr.split("dao: ", 1)[1].split(" MB from ", 1)[0])
    assert size / 1e6 < received < 1.3 * size / 1e6, done.stderr
    assert_runs(dockerd, "dao-test/big:v1")


def test_a_cold_mirror_whose_streams_stall_while_others_flow_is_kept(
    world: World, dockerd: Dockerd, tmp_path: Path, started: list[Stoppable]
) -> None:
    # A dao mirror with one fetch connection, cold, behind a slow upstream: of dao pull's parallel ranges of a
    # blob it serves the first at once, the others only when its one stream gets there (seconds later).
    slow = FaultProxy(tmp_path, world.upstream.url, "--rate", "300000")
    mirror = Mirror(tmp_path / "mirror", slow.url, args=("--fetch-connections", "1"))
    started += [slow, mirror]
    options = ("--no-engine-mirrors", "--stall-timeout", "1.5", "-j", "4", "--mirror", mirror.url)
    done = dao_pull(dockerd, tmp_path / "cache", *options, "dao-test/schema2:v1")
    assert done.returncode == 0, done.stderr
    assert "failed" not in done.stderr  # busy, not dead: never dropped for the registry (unreachable here)
    assert "registry-1.docker.io" not in done.stderr
    assert_runs(dockerd, "dao-test/schema2:v1")


def test_mirrors_from_dao_config_file(world: World, dockerd: Dockerd, tmp_path: Path, started: list[Stoppable]) -> None:
    mirror = FaultProxy(tmp_path, world.upstream.url)
    config = tmp_path / "config.toml"
    config.write_text(f'[pull]\nmirrors = ["{mirror.url}/"]\n')
    env = {"DOCKER_HOST": f"unix://{dockerd.sock}", "PATH": "/usr/bin:/bin", "DAO_CONFIG": str(config)}
    argv = [DAO, "pull", "--cache-dir", str(tmp_path / "cache"), "--no-engine-mirrors", "dao-test/schema2:v1"]
    started += [mirror]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    image = world.image("dao-test/schema2:v1")
    assert set(image.layer_digests()) <= {p.rsplit("/", 1)[1] for p in mirror.requests() if "/blobs/" in p}
    config.write_text("[pull]\nmirrors = 5\n")
    bad = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2  # a usage error, as every bad setting is
    assert bad.stderr.strip() == f"dao: error: {config}: [pull] mirrors: each must be http(s)://host[:port], got '5'"
    config.write_text("[pull]\nmirors = []\n")
    bad = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"dao: error: unknown setting 'mirors' in [pull] of {config}"


def test_pulls_over_a_segmented_link(
    segmented: World, dockerd: Dockerd, tmp_path: Path, started: list[Stoppable]
) -> None:
    """Tokens, manifests and blob heads that arrive in 100-byte pieces: dao pull straight from the registry,
    then through a cold mirror in front of it; both images run."""
    host = segmented.upstream.url.removeprefix("http://")
    done = dao_pull(dockerd, tmp_path / "c1", "--no-engine-mirrors", f"{host}/dao-test/schema2:v1")
    assert done.returncode == 0, done.stderr
    assert_runs(dockerd, f"{host}/dao-test/schema2:v1")
    mirror = Mirror(tmp_path / "mirror", segmented.upstream.url)
    started += [mirror]
    done = dao_pull(dockerd, tmp_path / "c2", "--no-engine-mirrors", "--mirror", mirror.url, "dao-test/multi:v1")
    assert done.returncode == 0, done.stderr
    assert_runs(dockerd, "dao-test/multi:v1")
    amd64 = segmented.image("dao-test/multi:v1").children[0]
    assert amd64.layer_digests()[-1] in blob_gets(mirror)  # busybox, the first, the engine already has


def test_a_mirror_is_asked_for_the_registry_of_the_image(
    world: World, tmp_path: Path, started: list[Stoppable]
) -> None:
    """Two registries hold different images under the same name. dao pull of the second one's image through a
    dao mirror asks it with ?ns= and gets the second registry's image, never Docker Hub's of that name; a
    mirror that cannot say which registry it serves (plain registry API) is not used for it at all."""
    other = Upstream(tmp_path / "other")
    started += [other]
    tiny = world.image("library/tiny:v1")  # under the name Docker Hub's stand-in gives dao-test/schema2:v1
    other.push("dao-test/schema2", "v1", tiny)
    host = other.url.removeprefix("http://")
    mirror = Mirror(tmp_path / "mirror", world.upstream.url, args=("--registry", f"{host}={other.url}"))
    plain = FaultProxy(tmp_path, world.upstream.url)  # the Docker Hub stand-in's API, not a dao mirror
    started += [mirror, plain]
    hub_offset = world.upstream.log_offset()
    no_engine = {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock", "PATH": "/usr/bin:/bin"}
    layout = tmp_path / "layout"
    argv = [DAO, "pull", "--cache-dir", str(tmp_path / "cache"), "--mirror", mirror.url, "--mirror", plain.url]
    done = subprocess.run(
        [*argv, "--output", f"oci:{layout}", f"{host}/dao-test/schema2:v1"],
        env=no_engine,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"mirror {plain.url} cannot say which registry it serves; not using it for {host} images" in done.stderr
    config = json.loads(tiny.manifest)["config"]["digest"]
    saved = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / saved.split(":")[1]).read_bytes())
    assert manifest["config"]["digest"] == config  # the second registry's image, not Hub's schema2
    assert [x["digest"] for x in manifest["layers"]] == tiny.layer_digests()
    assert [a.path for a in mirror.accesses() if "/manifests/" in a.path] == [
        f"/v2/dao-test/schema2/manifests/v1?ns={host}"
    ]
    assert config in blob_gets(mirror)
    assert plain.requests("/manifests/v1") == []
    assert [r for r in world.upstream.requests(hub_offset) if "/dao-test/" in r.path] == []


def test_a_plain_http_registry_docker_pulls_from(world: World, dockerd: Dockerd, tmp_path: Path) -> None:
    """A registry by a name that resolves into the engine's insecure range (127.0.0.0/8 by default): docker
    pulls it over plain HTTP, and so does dao pull (it tried HTTPS, as docker does, and failed over); without
    an engine, --output runs decide by the same defaults and --insecure-registry. (isolated.sh maps the name.)"""
    port = world.upstream.url.rsplit(":", 1)[1]
    ref = f"plain.registry.test:{port}/dao-test/schema2:v1"
    done = dao_pull(dockerd, tmp_path / "cache", "--no-engine-mirrors", ref)
    assert done.returncode == 0, done.stderr
    assert_runs(dockerd, ref)
    dockerd.reset()
    pulled = dockerd.docker("pull", ref, check=False)  # the reference tool agrees
    assert pulled.returncode == 0, pulled.stderr
    archive = tmp_path / "x.tar"
    no_engine = {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock", "PATH": "/usr/bin:/bin"}
    argv = [DAO, "pull", "--cache-dir", str(tmp_path / "c2"), "--insecure-registry", f"plain.registry.test:{port}"]
    out = subprocess.run(
        [*argv, "-o", f"docker-archive:{archive}", ref], env=no_engine, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert archive.stat().st_size > sum(p.stat().st_size for p in world.image("dao-test/schema2:v1").blobs.values())


def test_a_blob_in_the_cache_is_unlocked_while_the_pull_waits_for_another(
    world: World, tmp_path: Path, started: list[Stoppable]
) -> None:
    """Two dao pulls sharing a cache each hold one blob and wait for the other's: each releases a blob as soon
    as it is in the cache, not when its whole pull ends (else both wait for ever)."""
    import fcntl
    import os

    mirror = Mirror(tmp_path / "mirror", world.upstream.url)
    started += [mirror]
    cache = tmp_path / "cache"
    layers = [x["digest"].split(":")[1] for x in json.loads(world.image("dao-test/schema2:v1").manifest)["layers"]]
    first, held = layers[1], layers[2]
    (cache / "partial").mkdir(parents=True)
    other = os.open(cache / "partial" / f"{held}.lock", os.O_RDWR | os.O_CREAT, 0o644)  # "another pull" has it
    fcntl.flock(other, fcntl.LOCK_EX)
    env = {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock", "PATH": "/usr/bin:/bin"}
    argv = [DAO, "pull", "--cache-dir", str(cache), "--mirror", mirror.url, "--output", f"oci:{tmp_path / 'out'}"]
    pull = subprocess.Popen([*argv, "dao-test/schema2:v1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (cache / "blobs" / "sha256" / first).exists():
            assert pull.poll() is None and time.monotonic() < deadline, "the free blob never reached the cache"
            time.sleep(0.05)
        mine = os.open(cache / "partial" / f"{first}.lock", os.O_RDWR)
        try:
            fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free already: the pull is still waiting
        finally:
            os.close(mine)
        assert pull.poll() is None
    finally:
        os.close(other)  # the "other pull" is done with it (without finishing it): this one fetches it
    _, err = pull.communicate(timeout=120)
    assert pull.returncode == 0, err


def test_through_a_local_accelerator_the_engine_pulls_and_records_repo_digests(
    world: World, dockerd: Dockerd, tmp_path: Path, docker_mirror_port: int
) -> None:
    local = Mirror(tmp_path / "local", world.upstream.url, port=docker_mirror_port, args=("--local",))
    try:
        ref = "dao-test/schema2:v1"
        image = world.image(ref)
        done = dao_pull(dockerd, tmp_path / "cache", ref)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == "v1: Pulling from dao-test/schema2"
        assert f"Digest: {image.digest}" in lines
        assert "Status: Downloaded newer image for dao-test/schema2:v1" in lines
        assert sum(line.endswith(": Pull complete") for line in lines) == len(image.layer_digests())
        assert "loaded by dao" not in done.stderr
        assert not (tmp_path / "cache" / "blobs").exists()  # dao fetched nothing itself: the engine did
        assert set(image.layer_digests()) <= set(blob_gets(local))
        digests = json.loads(dockerd.docker("image", "inspect", "-f", "{{json .RepoDigests}}", ref).stdout)
        assert digests == [f"dao-test/schema2@{image.digest}"]
        again = dao_pull(dockerd, tmp_path / "cache", ref)
        assert "Status: Image is up to date for dao-test/schema2:v1" in again.stdout.splitlines()
        loaded = dao_pull(dockerd, tmp_path / "cache", "--load", "dao-test/oci:v1")
        assert loaded.returncode == 0, loaded.stderr
        assert "; fetched and loaded by dao, so no RepoDigests (--load)" in loaded.stderr
    finally:
        local.stop()


def test_without_a_local_accelerator_it_says_it_loads(
    world: World, dockerd: Dockerd, engine_mirror: Mirror, tmp_path: Path
) -> None:
    done = dao_pull(dockerd, tmp_path / "cache", "dao-test/oci:v1")
    assert done.returncode == 0, done.stderr
    assert "the engine's first registry mirror is not a local accelerator" in done.stderr
    assert "Status: Downloaded newer image for dao-test/oci:v1" in done.stdout
