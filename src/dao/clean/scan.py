"""Read a Docker host's state: what :func:`dao.clean.decide.decide` judges, gathered once.

:func:`read_state` asks the engine (containers and images, each inspected, volumes, networks, ``/system/df``
for the sizes df reports) and, when it is here, reads the data root (:mod:`dao.clean.dataroot`).
:class:`LayerBook` counts from it the bytes ``docker system df`` stops counting when a set of images goes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from dao.aio import gather_bounded
from dao.clean.dataroot import DataRoot
from dao.clean.plan import PlanError
from dao.engine import Engine, EngineError, EngineInfo
from dao.oci.layers import chain_ids

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
    pulling: str | None = None  # evidence that the engine is pulling or loading right now

    @cached_property
    def book(self) -> LayerBook:
        """Made once, before anything is removed (it reads broken images' configs from the data root), and
        shared by deciding and by counting what the removal freed."""
        return LayerBook(self)


async def read_state(engine: Engine, info: EngineInfo, *, build_cache: bool) -> State:
    notes: list[str] = []
    try:
        df = await engine.system_df()
    except EngineError as exc:
        if exc.status not in (400, 404):
            raise
        df, notes = {}, [*notes, "the engine has no /system/df (API < 1.25): sizes of containers and volumes unknown"]
    if build_cache and "BuildCache" not in df:
        raise PlanError("this engine reports no build cache (it needs Engine API 1.39 or newer)")

    listed = await engine.containers()

    async def inspect_container(entry: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return await engine.inspect_container(entry["Id"])
        except EngineError as exc:
            if exc.status == 404:  # removed while we looked
                return None
            raise

    containers = [c for c in await gather_bounded(listed, inspect_container, AT_ONCE) if c]

    images = await engine.images(intermediate=True)
    uninspectable: dict[str, str] = {}

    async def inspect_image(entry: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        try:
            return entry["Id"], await engine.inspect_image(entry["Id"])
        except EngineError as exc:
            if exc.status == 404:
                return entry["Id"], None
            uninspectable[entry["Id"]] = str(exc).split(": ", 1)[-1]  # a broken image: its layer files are gone
            return entry["Id"], None

    inspected = {k: v for k, v in await gather_bounded(images, inspect_image, AT_ONCE) if v is not None}
    volumes = df.get("Volumes") if df else await engine.volumes()
    networks = await engine.networks()

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
    state = State(
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
        dataroot.pull_in_progress() if dataroot else None,
    )
    _ = state.book  # read the layer data now: deciding stays free of I/O
    return state


class LayerBook:
    """Which layers each image holds, and so how many bytes ``docker system df`` stops counting when a set of
    images goes: the layers no remaining image references (df sums layers referenced by images)."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.by_id = {i["Id"]: i for i in state.images}
        self.df_images = {i["Id"]: i for i in state.df.get("Images") or []}
        self.chains = {image_id: self._chains(image_id) for image_id in self.by_id}
        # a layer BuildKit also holds stays on disk when its images go: df then counts it as build cache
        self.buildkit = state.dataroot.buildkit_chains() if state.dataroot else set()

    def _chains(self, image_id: str) -> list[str]:
        doc = self.state.inspected.get(image_id)
        layers = ((doc or {}).get("RootFS") or {}).get("Layers")
        if layers is None and self.state.dataroot is not None:  # broken images cannot be inspected
            layers = _config_layers(self.state.dataroot, image_id)
        return chain_ids([str(x) for x in layers or []])

    def freed_bytes(self, removed: list[str]) -> dict[str, int]:
        """Bytes df stops counting when these images go, attributed to the first one holding each layer."""
        root = self.state.dataroot
        gone = set(removed)
        out: dict[str, int] = {}
        if root is None:  # no layer sizes: estimate from the engine's per-image sizes
            for image_id in removed:
                entry = self.by_id[image_id]
                parent = self.by_id.get(entry.get("ParentId") or "")
                if parent is not None:  # a build step's image: its own layers are what it adds to its parent
                    out[image_id] = max(int(entry.get("Size") or 0) - int(parent.get("Size") or 0), 0)
                else:
                    df = self.df_images.get(image_id) or entry
                    out[image_id] = max(int(df.get("Size") or 0) - max(int(df.get("SharedSize") or 0), 0), 0)
            return out
        kept_chains = {chain for i, chains in self.chains.items() if i not in gone for chain in chains}
        counted: set[str] = set()
        for image_id in removed:
            total = 0
            for chain in self.chains[image_id]:
                if chain in kept_chains or chain in counted or chain in self.buildkit:
                    continue
                counted.add(chain)
                layer = root.layers.get(chain)
                total += layer.size if layer else 0
            out[image_id] = total
        return out


def _config_layers(root: DataRoot, image_id: str) -> list[str] | None:
    path = root.root / "image" / root.driver / "imagedb" / "content" / "sha256" / image_id.removeprefix("sha256:")
    try:
        return list(json.loads(path.read_text())["rootfs"]["diff_ids"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
