from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dao.registry.auth import parse_www_authenticate


def test_docker_hub_challenge() -> None:
    (c,) = parse_www_authenticate(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/ubuntu:pull"'
    )
    assert c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/ubuntu:pull",
    }


def test_several_challenges_quotes_and_escapes() -> None:
    got = parse_www_authenticate('Basic realm="a \\"quoted\\" realm, with comma", Bearer realm=x , error=insufficient')
    assert [c.scheme for c in got] == ["basic", "bearer"]
    assert got[0].params["realm"] == 'a "quoted" realm, with comma'
    assert got[1].params == {"realm": "x", "error": "insufficient"}


def test_scope_with_several_actions_and_token68() -> None:
    (c,) = parse_www_authenticate('Bearer realm="r",scope="repository:a/b:pull,push"')
    assert c.params["scope"] == "repository:a/b:pull,push"
    assert [c.scheme for c in parse_www_authenticate("Basic abc==")] == ["basic"]


value = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters='\\"'), max_size=20)
key = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)


@given(st.dictionaries(key, value, min_size=1, max_size=4))
def test_round_trip(params: dict[str, str]) -> None:
    header = "Bearer " + ",".join(f'{k}="{v}"' for k, v in params.items())
    (c,) = parse_www_authenticate(header)
    assert c.params == params


@given(st.text(max_size=200))
def test_never_raises(header: str) -> None:
    parse_www_authenticate(header)
