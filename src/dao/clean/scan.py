"""Read a Docker host's state: what :func:`dao.clean.decide.decide` judges, gathered once.

:func:`read_state` asks the engine (containers and images, each inspected, volumes, networks, ``/system/df``
for the sizes df reports) and, when it is here, reads the data root (:mod:`dao.clean.dataroot`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from dao.aio import gather_bounded
from dao.clean.dataroot import DataRoot
from dao.clean.plan import PlanError
from dao.docker import Engine, EngineError, EngineInfo

AT_ONCE = 8  # inspects in flight: a host with hundreds of images answers in a fraction of a second


@dataclass
class State:
    host: str
    containers: list[dict[str, Any]]  # container inspect documents
    images: list[dict[str, Any]]  # /images/json?all=1 entries
    inspected: dict[str, dict[str, Any]]  # image id -> inspect document
    uninspectable: dict[str, str]  # image id -> the engine's error when inspecting it failed
    df: dict[str, Any]  # /system/df, or {} on engines older than API 1.25
    volumes: list[dict[str, Any]]
    networks: list[dict[str, Any]]
    dataroot: DataRoot | None
    free: int | None  # free bytes on the data root's filesystem, when it is here
    notes: list[str] = field(default_factory=list)


async def read_state(engine: Engine, info: EngineInfo, *, build_cache: bool) -> State:
    notes: list[str] = []
    try:
        df = await engine.get("/system/df")
    except EngineError as exc:
        if exc.status not in (400, 404):
            raise
        df, notes = {}, [*notes, "the engine has no /system/df (API < 1.25): sizes of containers and volumes unknown"]
    if build_cache and "BuildCache" not in df:
        raise PlanError("this engine reports no build cache (it needs Engine API 1.39 or newer)")

    listed = await engine.get("/containers/json", all="1")

    async def inspect_container(entry: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return await engine.get(f"/containers/{entry['Id']}/json")
        except EngineError as exc:
            if exc.status == 404:  # removed while we looked
                return None
            raise

    containers = [c for c in await gather_bounded(listed, inspect_container, AT_ONCE) if c]

    images = await engine.get("/images/json", all="1")
    uninspectable: dict[str, str] = {}

    async def inspect_image(entry: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        try:
            return entry["Id"], await engine.get(f"/images/{entry['Id']}/json")
        except EngineError as exc:
            if exc.status == 404:
                return entry["Id"], None
            uninspectable[entry["Id"]] = str(exc).split(": ", 1)[-1]  # a broken image: its layer files are gone
            return entry["Id"], None

    inspected = {k: v for k, v in await gather_bounded(images, inspect_image, AT_ONCE) if v is not None}
    volumes = df.get("Volumes") if df else (await engine.get("/volumes")).get("Volumes")
    networks = await engine.get("/networks")

    dataroot = None
    if info.containerd_store:
        notes.append("the engine keeps images in containerd: broken images and orphan layers are not checked")
    else:
        dataroot = DataRoot.open(
            info.root_dir,
            info.driver,
            {i["Id"] for i in images},
            {c["Id"] for c in containers},
            local=engine.host.startswith("unix://"),
        )
        if dataroot is None:
            notes.append(
                f"the data root {info.root_dir or '?'} is not readable here (remote engine, or not root): "
                "layer sizes come from the engine's per-image numbers; orphan layers are not checked"
            )
    free = None
    if dataroot is not None:
        stat = os.statvfs(dataroot.root)
        free = stat.f_bavail * stat.f_frsize
    return State(
        engine.host,
        containers,
        images,
        inspected,
        uninspectable,
        df or {},
        volumes or [],
        networks or [],
        dataroot,
        free,
        notes,
    )
