"""Pure pieces of the mirror: Range parsing, configuration layering, and the order of the local accelerator's
prefetches."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dao.config import ConfigError, MirrorConfig, load
from dao.mirror.local import PREFETCH_WINDOW, LocalSources, prefetch_blobs
from dao.mirror.proxy import Proxy
from dao.mirror.serve import parse_range
from dao.oci.digest import Digest
from dao.oci.errors import RegistryError


def test_ranges() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-", 10) == (0, 9)
    assert parse_range("bytes=2-4", 10) == (2, 4)
    assert parse_range("bytes=2-400", 10) == (2, 9)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=-30", 10) == (0, 9)
    assert parse_range("bytes=5-", None) == (5, None)
    for bad in ("bytes=10-", "bytes=4-2", "bytes=-0", "bytes=-", "bytes=1-2,4-5", "items=1-2", "bytes=a-b"):
        with pytest.raises(RegistryError) as info:
            parse_range(bad, 10)
        assert info.value.status == 416


@given(st.text(max_size=30), st.one_of(st.none(), st.integers(0, 10**12)))
def test_range_parser_only_raises_range_errors(header: str, size: int | None) -> None:
    try:
        got = parse_range(header, size)
    except RegistryError as exc:
        assert exc.status == 416
        return
    if got is not None and size is not None:
        start, end = got
        assert end is not None and 0 <= start <= end < size


def test_config_layers(tmp_path: Path) -> None:
    f = tmp_path / "dao.toml"
    f.write_text('[mirror]\nlisten = "127.0.0.1:6000"\nmanifest-ttl = 5\nupstream = "http://127.0.0.1:1"\n')
    env = {"DAO_MIRROR_MANIFEST_TTL": "7", "DAO_MIRROR_ACCESS_LOG": "off"}
    cfg = load(MirrorConfig, "mirror", file=f, env=env, flags={"listen": "127.0.0.1:7000", "upstream": None})
    assert cfg.listen_address == ("127.0.0.1", 7000)  # flag beats file
    assert cfg.manifest_ttl == 7.0  # environment beats file
    assert cfg.access_log is False
    assert cfg.upstream == "http://127.0.0.1:1"


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        ("[mirror]\nbogus = 1\n", {}, "unknown setting 'bogus'"),
        ("[mirror\n", {}, "not valid TOML"),
        ("", {"DAO_MIRROR_MANIFEST_TTL": "soon"}, "DAO_MIRROR_MANIFEST_TTL"),
        ("", {"DAO_MIRROR_UPSTREAM": "ftp://x"}, "upstream must be"),
        ("", {"DAO_MIRROR_LISTEN": "nope"}, "listen must be"),
    ],
)
def test_config_errors(tmp_path: Path, content: str, env: dict[str, str], message: str) -> None:
    f = tmp_path / "dao.toml"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load(MirrorConfig, "mirror", file=f, env=env, flags={})


def test_every_mirror_error_has_its_oci_answer() -> None:
    """The HTTP boundary's one table: what a client sees for each of the mirror's errors."""
    from dao.mirror import errors as e
    from dao.mirror.app import wire

    cases: list[tuple[e.MirrorError, str, int]] = [
        (e.NotFound("blob", "x"), "BLOB_UNKNOWN", 404),
        (e.NotFound("manifest", "x"), "MANIFEST_UNKNOWN", 404),
        (e.Remembered("manifest", "x"), "MANIFEST_UNKNOWN", 404),
        (e.NotFound("repository", "x"), "NAME_UNKNOWN", 404),
        (e.NotProxied("x"), "NAME_UNKNOWN", 404),
        (e.BadDigest("x"), "DIGEST_INVALID", 400),
        (e.BadName("x"), "NAME_INVALID", 400),
        (e.Denied("x"), "DENIED", 403),
        (e.UpstreamRefused("x"), "DENIED", 403),
        (e.Busy("x", retry_after=5), "TOOMANYREQUESTS", 429),
        (e.QuotaUsed("x"), "TOOMANYREQUESTS", 429),
        (e.UpstreamLimited("x"), "TOOMANYREQUESTS", 429),
        (e.NotAuthenticated("x"), "UNAUTHORIZED", 401),
        (e.UpstreamDown("x", retry_after=14.6), "UNAVAILABLE", 503),
        (e.UpstreamBroken("x"), "UPSTREAM_ERROR", 502),
    ]
    for error, code, status in cases:
        wired = wire(error)
        assert (wired.code.name, wired.status, wired.message) == (code, status, "x"), error
    assert wire(e.Busy("x", retry_after=5)).headers == {"Retry-After": "5"}
    assert wire(e.UpstreamDown("x", retry_after=14.6)).headers == {"Retry-After": "15"}
    assert wire(e.UpstreamDown("x")).headers in (None, {})
    assert e.Remembered("blob", "x").cache == "negative"


class Upstream:
    """What ``prefetch_blobs`` asks of the proxy, with fetches that end when the test says so: it records the
    order the blobs were asked for and how many fetches ran at once."""

    def __init__(self, failing: set[str]) -> None:
        self.failing = failing
        self.asked: list[str] = []
        self.running = 0
        self.most = 0
        self.ends: dict[str, asyncio.Event] = {}

    async def open_blob(self, repo: str, digest: Digest, client: str) -> Any:
        self.asked.append(str(digest))
        if str(digest) in self.failing:
            raise ConnectionError("upstream down")
        end = self.ends[str(digest)] = asyncio.Event()
        self.running += 1
        self.most = max(self.most, self.running)

        async def run() -> None:
            await end.wait()
            self.running -= 1

        fetch = SimpleNamespace(keep=False, task=asyncio.create_task(run()), released=False)
        fetch.release = lambda: setattr(fetch, "released", True)
        return SimpleNamespace(local=None, fetch=fetch)


async def test_prefetches_go_in_the_manifests_order_a_window_at_a_time() -> None:
    digests = [str(Digest.of(b"%d" % i)) for i in range(10)]
    manifest = json.dumps(
        {"config": {"digest": digests[0]}, "layers": [{"digest": d} for d in [*digests[1:], digests[3]]]}
    ).encode()  # a layer twice: fetched once
    upstream = Upstream(failing={digests[2]})
    job = asyncio.create_task(prefetch_blobs(cast(Proxy, upstream), "library/x", manifest, window=3))
    await asyncio.sleep(0.05)
    assert upstream.asked == digests[:4]  # the window is full (the failed third gave its slot up): the rest wait
    for _ in range(50):  # bounded: ten blobs end in ten turns
        running = [d for d in upstream.asked if d in upstream.ends and not upstream.ends[d].is_set()]
        if not running:
            break
        upstream.ends[running[0]].set()  # the oldest fetch ends: the next blob in line takes its slot
        await asyncio.sleep(0.01)
    await asyncio.wait_for(job, 5)
    assert upstream.asked == digests  # in order, each once, and a failed one does not stop the rest
    assert upstream.most == 3
    assert upstream.running == 0


def _upstream(url: str, *, asked: bool = False) -> Any:
    """What LocalSources reads of a RegistryClient: its URL, whether it wanted authorization, its blob URLs."""
    return SimpleNamespace(
        base_url=url,
        open_to_others=not asked,
        open_blob_url=lambda repo, digest: None if asked else f"{url}/v2/{repo}/blobs/{digest}",
    )


def test_the_prefetch_window_follows_how_far_the_sources_are() -> None:
    sources = LocalSources(session=cast(Any, None), vias=[], peers=[], signer=None)
    mirror = _upstream("http://10.0.0.2:5000", asked=True)  # a mirror with accounts: nothing to step aside to
    assert sources.prefetch_window(mirror, "hit", 0.0001) is None  # nothing heard from upstream yet: all at once
    assert sources.prefetch_window(mirror, "miss", 0.007) == PREFETCH_WINDOW  # loopback's manifest time
    assert sources.prefetch_window(mirror, "hit", 0.0001) == PREFETCH_WINDOW  # a cached one says nothing new
    for _ in range(7):  # the quickest of the latest eight answers counts: a slow one does not make it far
        assert sources.prefetch_window(mirror, "revalidated", 0.35) == PREFETCH_WINDOW
    assert sources.prefetch_window(mirror, "revalidated", 0.35) is None  # eight round trips of a long link
    assert sources.prefetch_window(mirror, "swr", 0.0001) is None
    other = _upstream("http://10.0.0.3:5000", asked=True)  # each upstream is judged by its own answers
    assert sources.prefetch_window(other, "miss", 0.004) == PREFETCH_WINDOW
    assert sources.prefetch_window(mirror, "hit", 0.0001) is None


def test_near_anonymous_sources_get_the_engine_sent_to_them() -> None:
    digest = Digest.parse("sha256:" + "ab" * 32)
    sources = LocalSources(session=cast(Any, None), vias=[], peers=[], signer=None)
    mirror, registry = _upstream("http://127.0.0.1:5000"), _upstream("http://127.0.0.1:5001", asked=True)
    assert sources.aside(mirror, "library/x", digest) is None  # not known to be near yet
    assert sources.prefetch_window(mirror, "miss", 0.030) is None  # 30 ms: far, fetched here
    assert sources.aside(mirror, "library/x", digest) is None
    sources.observe(mirror, 0.0008)  # its ping at the start
    assert sources.prefetch_window(mirror, "miss", 0.030) == 0  # near and anonymous: no prefetch, the engine reads it
    assert sources.aside(mirror, "library/x", digest) == f"http://127.0.0.1:5000/v2/library/x/blobs/{digest}"
    sources.far(mirror)  # it failed us: fetched here again, through every source
    assert sources.aside(mirror, "library/x", digest) is None
    sources.observe(registry, 0.0008)  # near, but it asked for a token: ours, so the blob goes through us
    assert sources.prefetch_window(registry, "hit", 0.0) == PREFETCH_WINDOW
    assert sources.aside(registry, "library/x", digest) is None
    off = LocalSources(session=cast(Any, None), vias=[], peers=[], signer=None, step_aside=False)
    off.observe(mirror, 0.0008)
    assert off.aside(mirror, "library/x", digest) is None
    assert off.prefetch_window(mirror, "hit", 0.0) == PREFETCH_WINDOW


async def test_the_start_measures_how_near_the_source_is_from_answers_it_could_serve() -> None:
    def pinging(status: int | None) -> Any:
        async def ping() -> Any:
            if status is None:
                raise OSError("connection refused")
            return SimpleNamespace(status=status)

        return SimpleNamespace(base_url=f"http://127.0.0.1:{status or 1}", ping=ping)

    sources = LocalSources(session=cast(Any, None), vias=[], peers=[], signer=None)
    up, failing, gone = pinging(200), pinging(503), pinging(None)
    for upstream in (up, failing, gone):
        await sources.measure(upstream)
    assert sources.near(up)  # two loopback round trips
    assert not sources.near(failing)  # quick, but an engine sent there would get the 503
    assert not sources.near(gone)
