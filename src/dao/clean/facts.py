"""Reading the engine's JSON: timestamps, names, tags, and what containers say about their volumes. Pure."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any


def engine_time(text: Any) -> float | None:
    """An engine timestamp (RFC 3339 with nanoseconds, or unix seconds) as unix time; None for Go's zero time."""
    if isinstance(text, int | float):
        return float(text) or None
    if not text or str(text).startswith("0001-"):
        return None
    s = str(text).replace("Z", "+00:00")
    s = re.sub(r"(\.\d{6})\d+", r"\1", s)
    try:
        return datetime.fromisoformat(s).timestamp()
    except ValueError:
        return None


def container_name(container: dict[str, Any]) -> str:
    return str(container.get("Name", "")).lstrip("/")


def finished_at(container: dict[str, Any]) -> float | None:
    state = container.get("State") or {}
    return engine_time(state.get("FinishedAt")) or engine_time(container.get("Created"))


def tags(entry: dict[str, Any]) -> list[str]:
    return [t for t in entry.get("RepoTags") or [] if t != "<none>:<none>"]


def digests(entry: dict[str, Any]) -> list[str]:
    return [d for d in entry.get("RepoDigests") or [] if d != "<none>@<none>"]


def volume_evidence(containers: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """Volumes some container names (``-v name:/d``, ``--mount source=name``): named, whatever they look like;
    and volumes mounted where a container declares an anonymous one (``-v /d``, an image's ``VOLUME``):
    anonymous, unless some container names them. What engines before 23.0 leave as the only evidence."""
    named: set[str] = set()
    declared: set[str] = set()
    for c in containers:
        host = c.get("HostConfig") or {}
        for bind in host.get("Binds") or []:
            source = str(bind).split(":", 1)[0]
            if source and not source.startswith("/"):
                named.add(source)
        for mount in host.get("Mounts") or []:
            if mount.get("Type") == "volume" and mount.get("Source"):
                named.add(str(mount["Source"]))
        wanted = set((c.get("Config") or {}).get("Volumes") or {})
        for mount in c.get("Mounts") or []:
            if mount.get("Type") == "volume" and mount.get("Destination") in wanted and mount.get("Name"):
                declared.add(str(mount["Name"]))
    return named, declared
