"""What an agent tells the console about its Docker engine: the state as a whole (``state`` frames) and each
change as it happens (``event`` frames), in the console's terms, not the Engine API's.

The snapshot is small and flat (a busy host's fits a frame many times over): per container its ID, name,
image, state and status; per image its ID, tags and size; the disk use by kind. Events keep what the console
shows and acts on (type, action, the object's ID and name, an exit code) and drop the rest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from dao.channel.frames import Event, State
from dao.engine import Engine

EVENT_TYPES = ["container", "image", "volume", "network"]
_KEEP_ATTRIBUTES = ("name", "image", "exitCode", "signal")


async def snapshot(engine: Engine) -> State:
    containers = [
        {
            "id": str(c.get("Id", "")),
            "name": str((c.get("Names") or ["/"])[0]).lstrip("/"),
            "image": str(c.get("Image", "")),
            "state": str(c.get("State", "")),
            "status": str(c.get("Status", "")),
            "created": c.get("Created"),
            # what the console's scheduler knows its replicas by (dao.app, dao.service, ...); nothing else
            "labels": {k: str(v) for k, v in (c.get("Labels") or {}).items() if k.startswith("dao.")},
        }
        for c in await engine.containers(stopped=True)
    ]
    images = [
        {
            "id": str(i.get("Id", "")),
            "tags": [t for t in i.get("RepoTags") or [] if t != "<none>:<none>"],
            "size": i.get("Size") or 0,
            "created": i.get("Created"),
        }
        for i in await engine.images()
    ]
    return State(containers, images, disk_use(await engine.system_df()))


def disk_use(df: dict[str, Any]) -> dict[str, int]:
    """``/system/df`` summed by kind, in bytes (``docker system df``'s SIZE column)."""
    return {
        "images": int(df.get("LayersSize") or 0),
        "containers": sum(int(c.get("SizeRw") or 0) for c in df.get("Containers") or []),
        # -1: the engine did not compute it
        "volumes": sum(max(int((v.get("UsageData") or {}).get("Size") or 0), 0) for v in df.get("Volumes") or []),
        "build_cache": sum(int(b.get("Size") or 0) for b in df.get("BuildCache") or []),
    }


def event_frame(event: dict[str, Any]) -> Event:
    actor = event.get("Actor") or {}
    attributes = actor.get("Attributes") or {}
    return Event(
        {
            "type": str(event.get("Type", "")),
            "action": str(event.get("Action", "")),
            "id": str(actor.get("ID", "")),
            "time": event.get("timeNano", 0) / 1e9 if event.get("timeNano") else event.get("time"),
            **{k: str(attributes[k]) for k in _KEEP_ATTRIBUTES if k in attributes},
        }
    )


async def follow(engine: Engine, since: float | None = None) -> AsyncIterator[Event]:
    """The engine's events from ``since`` on, as frames, until the engine closes the stream."""
    async for event in engine.events(since=since, filters={"type": EVENT_TYPES}):
        yield event_frame(event)
