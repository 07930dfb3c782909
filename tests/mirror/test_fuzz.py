"""The mirror's HTTP surface under generated input: any path, query, header and Range gets a 4xx or a 2xx/3xx,
never a 5xx, and nothing it is sent makes it log a traceback. Requests go out as raw bytes (no client-side
normalisation), one connection each, against a real mirror in front of the real upstream (so every 5xx is
ours: the upstream is up). Bounded: a few hundred examples, no shrinking deadline."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import World
from tests.services.mirror import Mirror

KINDS = ["manifests", "blobs", "tags", "blobs/uploads", "", "referrers"]
NAMES = [
    "dao-test/schema2",
    "library/tiny",
    "tiny",
    "a",
    "unknown.example/x/y",
    "registry2.test/a",
    "UPPER/x",
    "a/../b",
    "%2e%2e",
]
SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._:%/~@+=!$&'()*,;", min_size=0, max_size=40)
HEADER_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
NUMBER = st.one_of(
    st.integers(min_value=-5, max_value=10**7).map(str),
    st.text(alphabet="0123456789", min_size=1, max_size=40),
    st.integers(min_value=4290, max_value=5000).map("9".__mul__),  # past int()'s 4300-digit limit
)


@pytest.fixture(scope="module")
def fuzzed(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mirror, list[str]]]:
    mirror = Mirror(tmp_path_factory.mktemp("fuzz") / "mirror", world.upstream.url)
    image = world.image("dao-test/schema2:v1")
    known = [*image.layer_digests(), image.digest]
    try:
        yield mirror, known
    finally:
        mirror.stop()


def send(port: int, request: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                return 0  # closed without an answer
            head += chunk
    return int(head.split(b" ", 2)[1])


@st.composite
def requests(draw: st.DrawFn, known: list[str]) -> bytes:
    method = draw(st.sampled_from(["GET", "GET", "GET", "HEAD", "PUT", "DELETE", "OPTIONS", "POST"]))
    name = draw(st.one_of(st.sampled_from(NAMES), SEGMENT))
    kind = draw(st.sampled_from(KINDS))
    # Known digests only where they belong: the CNCF registry answers a layer's digest asked as a manifest with
    # a 500 of its own, which the mirror rightly passes on as 503 (and which would open its circuit breaker).
    mine = known[-1:] if kind == "manifests" else known[:-1]
    ref = draw(
        st.one_of(st.sampled_from([*mine, "v1", "latest", "list", "sha256:" + "0" * 64, "sha256:", "md5:abc"]), SEGMENT)
    )
    blob = st.sampled_from(known[:-1]).map(lambda d: f"/v2/dao-test/schema2/blobs/{d}")  # cached: Range is parsed
    path = draw(
        st.one_of(
            st.just(f"/v2/{name}/{kind}/{ref}"),
            blob,
            blob,
            st.just("/v2/"),
            st.just(f"/{name}"),
            SEGMENT.map("/".__add__),
        )
    )
    query = draw(
        st.one_of(
            st.just(""),
            st.sampled_from(["ns=docker.io", "ns=quay.example", "ns=", "ns=evil.example", "n=5&last=a", "n=-1"]).map(
                "?".__add__
            ),
            SEGMENT.map("?".__add__),
        )
    )
    headers = {"Host": draw(st.one_of(st.just("mirror.test"), HEADER_VALUE.filter(bool)))}
    if draw(st.booleans()):
        first, last = draw(NUMBER), draw(NUMBER)
        headers["Range"] = draw(
            st.sampled_from([f"bytes={first}-{last}", f"bytes={first}-", f"bytes=-{last}", f"bytes={first}-{last},0-1"])
        )
    if draw(st.booleans()):
        headers["Accept"] = draw(st.one_of(HEADER_VALUE, st.just("application/vnd.oci.image.index.v1+json;q=x")))
    if draw(st.booleans()):
        headers["Authorization"] = draw(st.sampled_from(["Bearer ", "Basic ", "Basic !!!", "Digest x"])) + draw(
            HEADER_VALUE
        )
    for extra in draw(
        st.lists(st.sampled_from(["If-None-Match", "User-Agent", "X-Forwarded-For", "Content-Length"]), max_size=2)
    ):
        headers[extra] = draw(HEADER_VALUE)
    lines = [f"{method} {path}{query} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()), "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def test_no_input_gets_a_5xx_or_a_traceback(fuzzed: tuple[Mirror, list[str]]) -> None:
    mirror, known = fuzzed
    seen: dict[int, int] = {}

    @settings(
        max_examples=400,
        deadline=None,
        derandomize=True,  # the same examples in every run: a failure here is reproducible
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(st.data())
    def one(data: st.DataObject) -> None:
        request = data.draw(requests(known))
        status = send(mirror.port, request)
        seen[status] = seen.get(status, 0) + 1
        assert 0 < status < 500, request

    one()
    log = mirror.output()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
    assert sum(seen.values()) >= 400 and any(200 <= s < 300 for s in seen) and any(s == 404 for s in seen), seen


def test_the_fuzzer_reaches_the_blob_path(fuzzed: tuple[Mirror, list[str]], tmp_path: Path) -> None:
    """Its requests are not all turned away at the door: a known blob with a fuzzed Range is a 206 or 416."""
    mirror, known = fuzzed
    digest = known[1]
    assert (
        send(
            mirror.port,
            f"GET /v2/dao-test/schema2/blobs/{digest} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n".encode(),
        )
        == 206
    )
    huge = "9" * 5000
    assert (
        send(
            mirror.port,
            f"GET /v2/dao-test/schema2/blobs/{digest} HTTP/1.1\r\nHost: x\r\nRange: bytes={huge}-\r\n\r\n".encode(),
        )
        == 416
    )
