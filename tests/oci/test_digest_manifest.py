from __future__ import annotations

import contextlib
import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dao.oci import manifest as m
from dao.oci.digest import Digest, DigestError, Verifier
from dao.oci.errors import ErrorCode, RegistryError, parse_error_body


@given(st.binary(max_size=2048), st.sampled_from(["sha256", "sha384", "sha512"]))
def test_digest_round_trip_and_verifier(data: bytes, algorithm: str) -> None:
    d = Digest.of(data, algorithm)
    assert Digest.parse(str(d)) == d
    v = Verifier(d)
    for i in range(0, len(data), 100):
        v.update(data[i : i + 100])
    assert v.verified and v.size == len(data)
    v.update(b"x")
    assert not v.verified


@pytest.mark.parametrize(
    ("text", "unsupported"),
    [
        ("sha256:" + "a" * 63, False),
        ("sha256:" + "A" * 64, False),
        ("sha256:" + "g" * 64, False),
        ("sha256", False),
        (":abc", False),
        ("SHA256:" + "a" * 64, False),
        ("md5:" + "a" * 32, True),
        ("blake3:" + "a" * 64, True),
        ("sha256:../../etc/passwd", False),
    ],
)
def test_bad_digests(text: str, unsupported: bool) -> None:
    with pytest.raises(DigestError) as info:
        Digest.parse(text)
    assert info.value.unsupported is unsupported


@given(st.text(max_size=100))
def test_digest_parse_only_raises_digest_error(text: str) -> None:
    with contextlib.suppress(DigestError):
        Digest.parse(text)


def test_accept_parsing_and_keys() -> None:
    a = m.parse_accept([f"{m.DOCKER_MANIFEST_V2}; q=0.9, {m.OCI_INDEX}", m.DOCKER_MANIFEST_V2.upper()])
    assert a == (m.DOCKER_MANIFEST_V2, m.OCI_INDEX)
    assert m.accept_key(a) == m.accept_key(m.parse_accept([f"{m.OCI_INDEX},{m.DOCKER_MANIFEST_V2}"]))
    assert m.accept_key(a) != m.accept_key((m.DOCKER_MANIFEST_V2,))
    assert m.acceptable(m.OCI_INDEX, ())
    assert m.acceptable(m.OCI_INDEX, ("*/*",))
    assert not m.acceptable(m.OCI_INDEX, (m.DOCKER_MANIFEST_V2,))
    # only manifest types (and wildcards) survive: junk cannot mint cache keys
    assert m.parse_accept(["text/html, x/" + "y" * 500, f"{m.OCI_INDEX};q=1", "*/*"]) == ("*/*", m.OCI_INDEX)
    assert m.parse_accept(["image/png"]) == ()


def test_media_type_and_descriptors() -> None:
    d = "sha256:" + hashlib.sha256(b"x").hexdigest()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": m.OCI_MANIFEST,
                    "digest": d,
                    "size": 1,
                    "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
                }
            ],
        }
    ).encode()
    assert m.media_type_of(index, "application/json") == m.OCI_INDEX
    (desc,) = m.descriptors(index)
    assert str(desc.platform) == "linux/arm64/v8" and desc.size == 1
    image = json.dumps(
        {"mediaType": m.DOCKER_MANIFEST_V2, "config": {"digest": d, "size": 1}, "layers": [{"digest": d, "size": 1}]}
    ).encode()
    assert m.media_type_of(image, m.OCI_MANIFEST) == m.DOCKER_MANIFEST_V2  # the body's own field wins
    hostile = json.dumps({"mediaType": "text/html", "config": {"digest": d, "size": 1}}).encode()
    assert m.media_type_of(hostile, "text/html") == m.OCI_MANIFEST  # only known types become a Content-Type
    assert m.media_type_of(b"<html>", "text/html; charset=utf-8") == m.DOCKER_MANIFEST_V1_SIGNED
    assert len(m.descriptors(image)) == 2
    with pytest.raises(ValueError):
        m.descriptors(b'{"layers": [{"digest": "nope", "size": 1}]}')


def test_error_bodies() -> None:
    err = RegistryError(ErrorCode.BLOB_UNKNOWN, detail={"digest": "x"})
    assert err.status == 404
    assert json.loads(err.body()) == {
        "errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown to registry", "detail": {"digest": "x"}}]
    }
    assert parse_error_body(err.body()) == [("BLOB_UNKNOWN", "blob unknown to registry")]
    assert parse_error_body(b"<html>") == []
    assert parse_error_body(b'{"errors": 3}') == []
