"""Reference normalisation must match docker's (distribution/reference normalize_test.go cases)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dao.oci.reference import Reference, ReferenceError, normalize_repository

DIGEST = "sha256:" + "e" * 64


@pytest.mark.parametrize(
    ("text", "full", "familiar"),
    [
        ("ubuntu", "docker.io/library/ubuntu:latest", "ubuntu:latest"),
        ("ubuntu:22.04", "docker.io/library/ubuntu:22.04", "ubuntu:22.04"),
        ("library/ubuntu", "docker.io/library/ubuntu:latest", "ubuntu:latest"),
        ("docker.io/ubuntu", "docker.io/library/ubuntu:latest", "ubuntu:latest"),
        ("index.docker.io/ubuntu", "docker.io/library/ubuntu:latest", "ubuntu:latest"),
        ("user/app", "docker.io/user/app:latest", "user/app:latest"),
        ("localhost/app", "localhost/app:latest", "localhost/app:latest"),
        ("localhost:5000/a/b:t", "localhost:5000/a/b:t", "localhost:5000/a/b:t"),
        ("ghcr.io/org/app:1.0", "ghcr.io/org/app:1.0", "ghcr.io/org/app:1.0"),
        ("Foo/bar", "Foo/bar:latest", "Foo/bar:latest"),  # uppercase first component is a domain
        ("[::1]:5000/x", "[::1]:5000/x:latest", "[::1]:5000/x:latest"),
        (f"ubuntu@{DIGEST}", f"docker.io/library/ubuntu@{DIGEST}", f"ubuntu@{DIGEST}"),
        (f"ubuntu:22.04@{DIGEST}", f"docker.io/library/ubuntu:22.04@{DIGEST}", f"ubuntu:22.04@{DIGEST}"),
        ("a__b/c-----d/e.f", "docker.io/a__b/c-----d/e.f:latest", "a__b/c-----d/e.f:latest"),
    ],
)
def test_normalises_like_docker(text: str, full: str, familiar: str) -> None:
    ref = Reference.parse(text)
    assert str(ref) == full
    assert ref.familiar() == familiar


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "invalid reference format"),
        ("Ubuntu", "must be lowercase"),
        ("docker.io/Ubuntu", "must be lowercase"),
        ("e" * 64, "cannot specify 64-byte hexadecimal strings"),
        ("a/../b", "invalid reference format"),
        ("a//b", "invalid reference format"),
        ("ubuntu:-tag", "invalid reference format"),
        ("ubuntu@sha256:abc", "invalid reference format"),
        ("ubuntu@md5:" + "a" * 32, "unsupported digest algorithm"),
        ("a/" * 128 + "b", "not be more than 255"),
        ("-a/b", "invalid reference format"),
    ],
)
def test_rejects_what_docker_rejects(text: str, message: str) -> None:
    with pytest.raises(ReferenceError, match=message):
        Reference.parse(text)


def test_registry_host_and_reference() -> None:
    ref = Reference.parse("ubuntu")
    assert ref.registry_host == "registry-1.docker.io"
    assert ref.reference == "latest"
    pinned = Reference.parse(f"ghcr.io/o/a:1@{DIGEST}")
    assert pinned.registry_host == "ghcr.io"
    assert pinned.reference == DIGEST


component = st.from_regex(r"[a-z0-9]{1,5}(?:(?:[._]|__|-{1,3})[a-z0-9]{1,5}){0,2}", fullmatch=True)
tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@given(st.lists(component, min_size=1, max_size=4), st.one_of(st.none(), tag))
def test_familiar_form_round_trips(path: list[str], tag_: str | None) -> None:
    text = "/".join(path) + (f":{tag_}" if tag_ else "")
    if len(text) > 200:
        return
    try:
        ref = Reference.parse(text)
    except ReferenceError as exc:
        assert "64-byte" in str(exc)  # only the image-ID rule can refuse a well-formed name
        return
    assert Reference.parse(ref.familiar()) == ref
    assert Reference.parse(str(ref)) == ref


@given(st.text(max_size=60))
def test_parse_never_raises_anything_but_reference_error(text: str) -> None:
    with contextlib.suppress(ReferenceError):
        Reference.parse(text)


def test_normalize_repository() -> None:
    assert normalize_repository("ubuntu") == "library/ubuntu"
    assert normalize_repository("a/b") == "a/b"
    for bad in ("", "..", "a/../b", "a//b", "A/b", "a/b/", "/a", "a/.b", "a%2fb"):
        with pytest.raises(ReferenceError):
            normalize_repository(bad)
