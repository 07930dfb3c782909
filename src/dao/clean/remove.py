"""Remove what a plan lists, through the engine only, re-checking each item just before it goes.

Applying a plan means: scan again with the plan's options, keep the plan's items that the fresh scan still
finds to be garbage (in the fresh plan's order, so containers go before their images), then for each one ask
the engine about that very item once more and remove it without ``force``: a container started since the
scan, an image a new container uses, a volume or network something attached to, is skipped, not removed. The
engine's own refusals (409) are the last line and are reported as skips too.

Orphan layers have no removal call. We load a tiny image whose rootfs is the orphan chain (a docker-archive
with the config only: the engine already has every layer and never opens a layer file it has, moby
``image/tarexport/load.go``) and delete that image; the engine's reference counting then drops the layers
unless something else (a running pull, the build cache) still holds them, which only leaves them in place.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dao.aio import gather_bounded
from dao.clean.plan import Item, Plan
from dao.clean.scan import State
from dao.engine import Engine, EngineError
from dao.engine.archive import docker_archive

RECLAIM_LABEL = "dao.clean.reclaim"


@dataclass
class Outcome:
    item: Item
    status: str  # removed, skipped, failed
    detail: str = ""


@dataclass
class Result:
    outcomes: list[Outcome] = field(default_factory=list)
    size: int = 0  # bytes docker system df no longer counts
    hidden: int = 0  # bytes df never counted (orphan layers) that are gone from disk

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def to_json(self) -> dict[str, Any]:
        return {
            "removed": [_row(o) for o in self.outcomes if o.status == "removed"],
            "skipped": [_row(o) for o in self.outcomes if o.status == "skipped"],
            "failed": [_row(o) for o in self.outcomes if o.status == "failed"],
            "size": self.size,
            "hidden": self.hidden,
        }


def _row(outcome: Outcome) -> dict[str, Any]:
    item = outcome.item
    return {"kind": item.kind, "id": item.id, "name": item.name, "size": item.size, "detail": outcome.detail}


def select(wanted: Plan, fresh: Plan) -> tuple[list[Item], list[Outcome]]:
    """The items of ``wanted`` that ``fresh`` still lists (fresh order and data), and skips for the rest."""
    keys = {item.key for item in wanted.items}
    todo = [item for item in fresh.items if item.key in keys]
    now_garbage = {item.key for item in todo}
    rules = {(s.kind, s.id): s.rule for s in fresh.spared}
    skipped = [
        Outcome(item, "skipped", rules.get(item.key) or "no longer garbage")
        for item in wanted.items
        if item.key not in now_garbage
    ]
    return todo, skipped


async def apply(
    engine: Engine,
    items: list[Item],
    state: State,
    report: Callable[[Outcome], None] = lambda o: None,
    at_once: int = 8,
) -> Result:
    """Remove ``items`` in waves: each kind after the kinds before it, an item after the items listed in its
    ``data["after"]`` (an image's children, a cache record's), up to ``at_once`` removals at a time."""
    result = Result()
    removed_images: list[str] = []

    async def remove(item: Item) -> Outcome:
        try:
            detail = await _REMOVERS[item.kind](engine, item)
        except EngineError as exc:
            if exc.status in (404, 409):  # gone already, or the engine says it is in use: not ours to force
                return Outcome(item, "skipped", str(exc).split(": ", 1)[-1])
            if exc.status is None:  # the engine went away: stop, rather than fail every item the same way
                raise
            return Outcome(item, "failed", str(exc))
        return Outcome(item, "skipped", detail) if detail else Outcome(item, "removed")

    outcomes: list[Outcome] = []
    for wave in _waves(items):
        outcomes += await gather_bounded(wave, remove, at_once)
        for outcome in outcomes[-len(wave) :]:
            report(outcome)
    for outcome in outcomes:
        item = outcome.item
        if outcome.status == "removed":
            if item.kind in ("image", "broken-image"):
                removed_images.append(item.id)
            elif item.kind == "layer":
                result.hidden += item.hidden
            else:
                result.size += item.size
        result.outcomes.append(outcome)
    # what the removed images free depends on which of them really went: count their layers again
    sizes = state.book.freed_bytes(removed_images)
    result.size += sum(sizes.values())
    for outcome in result.outcomes:
        if outcome.item.id in sizes:
            outcome.item.size = sizes[outcome.item.id]
    return result


_PHASE = {"broken-image": "image"}  # one phase: a broken image may be a dangling one's parent


def _waves(items: list[Item]) -> list[list[Item]]:
    waves: list[list[Item]] = []
    i = 0
    while i < len(items):
        phase = _PHASE.get(items[i].kind, items[i].kind)
        j = i
        while j < len(items) and _PHASE.get(items[j].kind, items[j].kind) == phase:
            j += 1
        pending = items[i:j]
        while pending:
            waiting = {item.id for item in pending}
            ready = [item for item in pending if not waiting & set(item.data.get("after", []))]
            if not ready:  # a cycle cannot happen in a parent chain; never loop on bad data
                ready = pending
            waves.append(ready)
            pending = [item for item in pending if item not in ready]
        i = j
    return waves


# Each remover re-checks its item and removes it; it returns why it skipped, or "" when it removed.


async def _container(engine: Engine, item: Item) -> str:
    doc = await engine.inspect_container(item.id)
    state = doc.get("State") or {}
    status = state.get("Status")
    if status not in ("exited", "dead", "created"):
        return f"now {status}"
    if state.get("FinishedAt") != item.data.get("finished"):
        return "ran again since the scan"
    await engine.remove_container(item.id)
    return ""


async def _users(engine: Engine, **filters: list[str]) -> list[str]:
    found = await engine.containers(filters=filters)
    return [str((c.get("Names") or ["?"])[0]).lstrip("/") for c in found]


async def _image_users(engine: Engine, image_id: str) -> list[str]:
    containers = await engine.containers()
    return [str((c.get("Names") or ["?"])[0]).lstrip("/") for c in containers if c.get("ImageID") == image_id]


async def _image(engine: Engine, item: Item) -> str:
    users = await _image_users(engine, item.id)
    if users:
        return f"now used by container {', '.join(users)}"
    if item.kind == "image" and not item.reason.startswith("unused"):  # it was garbage for having no tag
        doc = await engine.inspect_image(item.id)
        if doc is None:
            return "gone already"
        if [t for t in doc.get("RepoTags") or [] if t != "<none>:<none>"]:
            return "tagged since the scan"
    # noprune: untagged parents are items of their own, planned and re-checked like this one
    try:
        await engine.remove_image(item.id)
    except EngineError as exc:
        if exc.status != 409 or "multiple repositories" not in str(exc):
            raise
        # by ID the engine wants force when several repositories name it; drop each name instead (as docker
        # image prune does): the last one takes the image
        doc = await engine.inspect_image(item.id) or {}
        tags = [n for n in doc.get("RepoTags") or [] if "<none>" not in n]
        names = tags + [n for n in doc.get("RepoDigests") or [] if "<none>" not in n]
        if not names:
            raise
        return await _untag_each(engine, item.id, names, tags)
    return ""


async def _untag_each(engine: Engine, image_id: str, names: list[str], tags: list[str]) -> str:
    """Drop the names one by one, asking before each whether a container started on the image meanwhile: if
    one did, stop, and give back the tags already dropped, so the container's image keeps every name."""
    dropped: list[str] = []
    for name in names:
        users = await _image_users(engine, image_id)
        if users:
            for tag in (t for t in dropped if t in tags):
                repo, _, version = tag.rpartition(":")
                await engine.tag_image(image_id, repo, version)
            return f"now used by container {', '.join(users)} (its names kept)"
        await engine.remove_image(name)
        dropped.append(name)
    return ""


async def _volume(engine: Engine, item: Item) -> str:
    users = await _users(engine, volume=[item.id])
    if users:
        return f"now used by container {', '.join(users)}"
    await engine.remove_volume(item.id)
    return ""


async def _network(engine: Engine, item: Item) -> str:
    doc = await engine.inspect_network(item.id)
    users = await _users(engine, network=[item.id])
    if doc.get("Containers") or users:
        return f"now used by container {', '.join(users) or 'attached'}"
    await engine.remove_network(item.id)
    return ""


async def _build_cache(engine: Engine, item: Item) -> str:
    """BuildKit prunes one record at a time and says null, not [], when it pruned nothing. A prune running
    beside another (a wave removes several records at once) may skip a record the other holds, or see it
    go with its parent: so a record not in the answer is tried once more, and then looked for."""
    for attempt in range(2):
        answer = await engine.prune_build_cache([item.id])
        if item.id in ((answer or {}).get("CachesDeleted") or []):
            return ""
        if attempt == 0:
            await asyncio.sleep(0.2)
    df = await engine.system_df()
    if not any(b.get("ID") == item.id for b in df.get("BuildCache") or []):
        return ""  # gone: its space is free, whoever pruned it
    return "in use by a build"


async def _layer(engine: Engine, item: Item) -> str:
    diff_ids = item.data["diff_ids"]
    config, image_id = reclaim_config(diff_ids)
    # no layer files: the engine has every layer of the chain, and never opens the file of one it has
    await engine.load(
        docker_archive(f"{image_id[7:]}.json", config, [], [(f"{d[7:]}/layer.tar", None) for d in diff_ids])
    )
    doc = await engine.inspect_image(image_id)
    labels = ((doc or {}).get("Config") or {}).get("Labels") or {}
    if RECLAIM_LABEL not in labels:  # never delete an image we did not just make
        return "the engine did not take the reclaim image"
    answer = await engine.remove_image(image_id, noprune=False)
    deleted = {str(entry.get("Deleted")) for entry in answer or [] if isinstance(entry, dict)}
    if not set(item.data.get("chains", [])) & deleted:
        return "the engine still holds these layers (a pull or the build cache uses them)"
    return ""


_REMOVERS = {
    "container": _container,
    "image": _image,
    "broken-image": _image,
    "volume": _volume,
    "network": _network,
    "build-cache": _build_cache,
    "layer": _layer,
}


def reclaim_config(diff_ids: list[str]) -> tuple[bytes, str]:
    """The config of one image over these layers, and its ID. A random label makes the ID one no other image
    has, so deleting it can only drop what it referenced."""
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {"Labels": {RECLAIM_LABEL: secrets.token_hex(8)}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        },
        sort_keys=True,
    ).encode()
    return config, "sha256:" + hashlib.sha256(config).hexdigest()
