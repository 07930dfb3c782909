"""The pure parts of dao clean: durations, reference spellings, and decide() on hand-made engine states."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dao.clean.dataroot import DataRoot
from dao.clean.decide import decide
from dao.clean.plan import Item, Options, Plan, Spared
from dao.clean.policy import ref_names
from dao.clean.remove import _waves, reclaim_config, select
from dao.clean.scan import State
from dao.units import UnitError, parse_duration

NOW = 2_000_000_000.0
OLD = "2020-01-01T00:00:00.123456789Z"


@given(st.integers(0, 10_000), st.sampled_from("smhdw"))
def test_durations(n: int, unit: str) -> None:
    assert parse_duration(f"{n}{unit}") == n * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]


@pytest.mark.parametrize("text", ["", "1", "h", "1x", "-1h", "1h-", "soon"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UnitError):
        parse_duration(text)


def test_compound_duration() -> None:
    assert parse_duration("1h30m") == 5400 and parse_duration("0") == 0


def test_reference_spellings() -> None:
    assert {"nginx:1", "library/nginx:1", "docker.io/library/nginx:1"} <= ref_names("nginx:1")
    assert "nginx:1" in ref_names("docker.io/library/nginx:1")
    assert ref_names("ghcr.io/a/b:1") == {"ghcr.io/a/b:1"}


def _container(id_: str, status: str, image: str = "sha256:img", **extra: Any) -> dict[str, Any]:
    return {
        "Id": id_,
        "Name": f"/{id_}",
        "Image": image,
        "Created": OLD,
        "State": {"Status": status, "FinishedAt": OLD, "ExitCode": 0},
        "HostConfig": {"RestartPolicy": {"Name": extra.pop("restart", "no")}, "NetworkMode": "default"},
        "Config": {"Labels": {}},
        "Mounts": [],
        "NetworkSettings": {"Networks": {}},
        **extra,
    }


def _image(id_: str, tags: list[str] | None = None, parent: str = "", digests: list[str] | None = None) -> dict:
    return {"Id": id_, "RepoTags": tags, "RepoDigests": digests, "ParentId": parent, "Created": 1, "Size": 10}


def _state(**parts: Any) -> State:
    return State(
        host="unix:///x",
        containers=parts.get("containers", []),
        images=parts.get("images", []),
        inspected={},
        uninspectable={},
        df=parts.get("df", {}),
        volumes=parts.get("volumes", []),
        networks=parts.get("networks", []),
        dataroot=None,
        free=None,
    )


def _plan(state: State, **options: Any) -> Plan:
    return decide(state, Options(grace=0, **options), NOW)


def test_restart_always_containers_are_spared() -> None:
    plan = _plan(_state(containers=[_container("a", "exited", restart="always"), _container("b", "created")]))
    assert [(i.id, i.reason) for i in plan.items] == [("b", "created, never started")]
    assert "restart policy always" in plan.spared[0].rule


def test_keep_label_spares_a_container_and_what_it_uses() -> None:
    kept = _container("k", "exited", image="sha256:old")
    kept["Config"]["Labels"] = {"dao.keep": "true"}
    plan = _plan(_state(containers=[kept], images=[_image("sha256:old")]))
    assert plan.items == []
    assert {s.rule for s in plan.spared} == {"labelled dao.keep=true", "used by container k"}


def test_untagged_parents_go_after_their_child() -> None:
    # a classic build: tagged app <- untagged step <- untagged step; re-tagging app left the top dangling
    images = [
        _image("sha256:top", parent="sha256:mid"),
        _image("sha256:mid", parent="sha256:low"),
        _image("sha256:low"),
    ]
    images.append(_image("sha256:tagged", tags=["x:1"], digests=["x@sha256:1"]))
    plan = _plan(_state(images=images))
    assert [i.id for i in plan.items] == ["sha256:top", "sha256:mid", "sha256:low"]
    assert plan.items[1].reason.startswith("untagged parent of")


def test_build_steps_behind_an_unused_image_go_with_it() -> None:
    images = [_image("sha256:app", tags=["app:1"], parent="sha256:step"), _image("sha256:step")]
    assert _plan(_state(images=images)).items == []
    plan = _plan(_state(images=images), images_unused=True)
    assert [(i.id, i.data["after"]) for i in plan.items] == [("sha256:app", []), ("sha256:step", ["sha256:app"])]


def test_an_untagged_image_with_a_digest_is_dangling() -> None:
    # docker pull x:1 twice across an update: the old image keeps x@sha256:... and loses the tag
    plan = _plan(_state(images=[_image("sha256:old", digests=["x@sha256:1"]), _image("sha256:new", tags=["x:1"])]))
    assert [(i.id, i.name) for i in plan.items] == [("sha256:old", "x@sha256:1")]
    plan = _plan(_state(images=[_image("sha256:new", tags=["x:1"])]), images_unused=True)
    assert [i.id for i in plan.items] == ["sha256:new"]


def test_networks_volumes_and_build_cache() -> None:
    nets = [
        {"Name": n, "Id": n, "Driver": d, "Scope": s, "Created": OLD}
        for n, d, s in [("bridge", "bridge", "local"), ("mine", "bridge", "local"), ("ov", "overlay", "swarm")]
    ]
    user = _container("run", "running")
    user["NetworkSettings"]["Networks"] = {"used": {"NetworkID": "used-id"}}
    user["Mounts"] = [{"Type": "volume", "Name": "a" * 64}]
    nets.append({"Name": "used", "Id": "used-id", "Driver": "bridge", "Scope": "local", "Created": OLD})
    volumes = [
        {"Name": "a" * 64, "CreatedAt": OLD, "UsageData": {"Size": 5}},
        {"Name": "b" * 64, "CreatedAt": OLD, "UsageData": {"Size": 7}, "Labels": {"com.docker.volume.anonymous": ""}},
        {"Name": "named", "CreatedAt": OLD, "UsageData": {"Size": 9}},
        {"Name": "c" * 64, "CreatedAt": OLD, "UsageData": {"Size": 11}},  # `docker volume create <64 hex>`
    ]
    cache = [
        {"ID": "p", "Parent": "", "Type": "regular", "Size": 3, "LastUsedAt": OLD},
        {"ID": "c", "Parent": "p", "Type": "regular", "Size": 4, "LastUsedAt": OLD},
        {"ID": "s", "Parent": "", "Type": "regular", "Size": 5, "LastUsedAt": OLD, "Shared": True},
        {"ID": "u", "Parent": "", "Type": "regular", "Size": 6, "LastUsedAt": OLD, "InUse": True},
    ]
    state = _state(containers=[user], networks=nets, volumes=volumes, df={"BuildCache": cache})
    plan = _plan(state, kinds=("volumes", "networks", "build-cache"))
    assert [(i.kind, i.id, i.size) for i in plan.items] == [
        ("volume", "b" * 64, 7),
        ("network", "mine", 0),
        ("build-cache", "c", 4),  # children before their parent
        ("build-cache", "p", 3),
    ]
    assert ("volume", "c" * 64) in {(x.kind, x.id) for x in plan.spared}  # a random-looking name proves nothing
    plan = _plan(state, kinds=("volumes",), volumes_named=True)
    assert {i.id for i in plan.items} == {"b" * 64, "named", "c" * 64}


def test_which_volumes_containers_show_to_be_anonymous() -> None:
    """Engines before 23.0 label no volume anonymous: a container's own config is the evidence."""
    from dao.clean.facts import volume_evidence as _volume_evidence

    anon = {"Config": {"Volumes": {"/data": {}}}, "HostConfig": {"Binds": None}}
    anon["Mounts"] = [{"Type": "volume", "Name": "1" * 64, "Destination": "/data"}]
    bound = {"Config": {"Volumes": {"/d": {}}}, "HostConfig": {"Binds": ["2" * 64 + ":/d:ro", "/host:/h"]}}
    bound["Mounts"] = [{"Type": "volume", "Name": "2" * 64, "Destination": "/d"}]
    mounted = {"Config": {}, "HostConfig": {"Mounts": [{"Type": "volume", "Source": "3" * 64, "Target": "/m"}]}}
    mounted["Mounts"] = [{"Type": "volume", "Name": "3" * 64, "Destination": "/m"}]
    inherited = {"Config": {}, "HostConfig": {"VolumesFrom": ["x"]}}  # --volumes-from: not its own declaration
    inherited["Mounts"] = [{"Type": "volume", "Name": "4" * 64, "Destination": "/v"}]
    named, declared = _volume_evidence([anon, bound, mounted, inherited])
    assert named == {"2" * 64, "3" * 64}  # named by -v name:/d or --mount source=name, however they look
    assert declared - named == {"1" * 64}


def test_grace_and_until() -> None:
    young = _container("y", "exited")
    young["State"]["FinishedAt"] = datetime.fromtimestamp(NOW - 20, UTC).isoformat()
    plan = decide(_state(containers=[young]), Options(grace=60), NOW)
    assert plan.items == [] and "within 1m" in plan.spared[0].rule
    assert [i.id for i in decide(_state(containers=[young]), Options(grace=0, until=10), NOW).items] == ["y"]
    assert decide(_state(containers=[young]), Options(grace=0, until=30), NOW).items == []


def test_select_keeps_only_what_is_still_garbage() -> None:
    wanted = Plan("h", Options(), [Item("container", "a", "a", "r"), Item("container", "b", "b", "r")])
    fresh = Plan("h", Options(), [Item("container", "a", "a", "r")], [Spared("container", "b", "b", "now running")])
    todo, skipped = select(wanted, fresh)
    assert [i.id for i in todo] == ["a"]
    assert [(o.item.id, o.detail) for o in skipped] == [("b", "now running")]


def test_reclaim_images_are_new_every_time() -> None:
    a, id_a = reclaim_config(["sha256:" + "1" * 64])
    b, id_b = reclaim_config(["sha256:" + "1" * 64])
    assert id_a != id_b and a != b
    assert id_a == "sha256:" + hashlib.sha256(a).hexdigest()


def test_removal_waves_keep_kinds_and_parents_in_order() -> None:
    items = [
        Item("container", "c1", "", ""),
        Item("container", "c2", "", ""),
        Item("broken-image", "b", "", ""),
        Item("image", "child", "", ""),
        Item("image", "parent", "", "", data={"after": ["child"]}),
        Item("image", "grandparent", "", "", data={"after": ["parent"]}),
        Item("volume", "v", "", ""),
    ]
    waves = [[i.id for i in wave] for wave in _waves(items)]
    assert waves == [["c1", "c2"], ["b", "child"], ["parent"], ["grandparent"], ["v"]]


def test_the_data_root_is_used_only_when_it_is_the_engines(tmp_path: Path) -> None:
    content = tmp_path / "image" / "overlay2" / "imagedb" / "content" / "sha256"
    content.mkdir(parents=True)
    (content / ("1" * 64)).write_text("{}")
    (tmp_path / "image" / "overlay2" / "layerdb" / "sha256").mkdir(parents=True)
    (tmp_path / "containers" / "c1").mkdir(parents=True)
    image = {"sha256:" + "1" * 64}
    root = str(tmp_path)
    assert DataRoot.open(root, "overlay2", image, {"c1"}, local=False) is not None
    assert DataRoot.open(root, "overlay2", set(), set(), local=True) is not None
    assert DataRoot.open(root, "overlay2", set(), set(), local=False) is None  # nothing to compare over TCP
    assert DataRoot.open(root, "overlay2", {"sha256:" + "2" * 64}, set(), local=True) is None  # another engine
    assert DataRoot.open(root, "overlay2", image, {"c2"}, local=True) is None
    assert DataRoot.open(str(tmp_path / "nowhere"), "overlay2", set(), set(), local=True) is None


class _BuildKit:
    """An engine whose build-cache prune answers as BuildKit does when it pruned nothing: null."""

    def __init__(self, left: list[str]) -> None:
        self.left, self.prunes = left, 0

    async def prune_build_cache(self, ids: list[str]) -> dict:
        self.prunes += 1
        return {"CachesDeleted": None, "SpaceReclaimed": 0}

    async def system_df(self) -> dict:
        return {"BuildCache": [{"ID": i} for i in self.left]}


async def test_a_build_cache_prune_answered_with_null_is_looked_into_not_a_traceback() -> None:
    from dao.clean.plan import Item
    from dao.clean.remove import _build_cache

    item = Item("build-cache", "abc123", "abc123", "unused build cache")
    gone = _BuildKit(left=[])
    assert await _build_cache(gone, item) == "" and gone.prunes == 2  # pruned beside another: gone all the same
    kept = _BuildKit(left=["abc123"])
    assert await _build_cache(kept, item) == "in use by a build"
