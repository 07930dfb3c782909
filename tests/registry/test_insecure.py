"""Which registries are insecure, decided from the engine's RegistryConfig as docker decides it."""

from __future__ import annotations

from dao.registry.insecure import InsecureRegistries

ENGINE = {  # /info's RegistryConfig of an engine with "insecure-registries": ["reg.corp:5000", "10.231.0.0/16"]
    "IndexConfigs": {
        "docker.io": {"Name": "docker.io", "Mirrors": [], "Secure": True, "Official": True},
        "reg.corp:5000": {"Name": "reg.corp:5000", "Mirrors": [], "Secure": False, "Official": False},
    },
    "InsecureRegistryCIDRs": ["10.231.0.0/16", "127.0.0.0/8"],
}

NAMES = {"build.corp": ["10.231.4.2"], "public.example": ["198.51.100.7"], "both.corp": ["198.51.100.8", "10.231.9.9"]}


async def fake_resolve(host: str) -> list[str]:
    """No lookups leave the test: the answers a resolver would give."""
    return NAMES.get(host, [])


async def test_index_configs_then_cidrs_of_resolved_addresses() -> None:
    config = InsecureRegistries.from_engine(ENGINE)
    verdicts = {
        name: await config.insecure(name, fake_resolve)
        for name in [
            "docker.io",  # IndexConfigs: secure
            "reg.corp:5000",  # IndexConfigs: insecure, without a lookup
            "build.corp:5000",  # resolves into 10.231.0.0/16
            "both.corp",  # one of its addresses is in a range: enough, as for docker
            "public.example:443",
            "unknown.example",  # does not resolve: secure
            "127.0.0.1:5000",
            "10.231.0.2:5000",  # an address is checked as itself
            "[::1]:5000",  # not in this engine's ranges
        ]
    }
    assert verdicts == {
        "docker.io": False,
        "reg.corp:5000": True,
        "build.corp:5000": True,
        "both.corp": True,
        "public.example:443": False,
        "unknown.example": False,
        "127.0.0.1:5000": True,
        "10.231.0.2:5000": True,
        "[::1]:5000": False,
    }


async def test_defaults_flags_and_old_engines() -> None:
    none = InsecureRegistries.from_engine(None)  # no engine (--output): docker's defaults
    assert await none.insecure("127.0.0.1:5000", fake_resolve)
    assert await none.insecure("[::1]:5000", fake_resolve)
    assert not await none.insecure("build.corp:5000", fake_resolve)
    flagged = none.adding(["build.corp:5000", "198.51.100.0/24"])  # --insecure-registry
    assert await flagged.insecure("build.corp:5000", fake_resolve)
    assert not await flagged.insecure("build.corp:5001", fake_resolve)  # the port is part of the name
    assert await flagged.insecure("public.example", fake_resolve)
    old = InsecureRegistries.from_engine({"InsecureRegistryCIDRs": [{"IP": "10.231.0.0", "Mask": "//8AAA=="}]})
    assert await old.insecure("build.corp", fake_resolve)  # Go's net.IPNet as JSON: mask 255.255.0.0
    assert not await old.insecure("127.0.0.1", fake_resolve)  # the engine's list replaces the default
