"""The engine's own pull, through this host's local accelerator (``dao mirror serve --local``).

When the engine's first ``registry-mirrors`` entry is a local accelerator, ``dao pull`` of a Docker Hub image
asks the engine to pull (``POST /images/create``) instead of fetching and loading the image itself: the
accelerator already fetches each blob from every source at once, the engine unpacks each layer as it
streams in, and the image it leaves is the one ``docker pull`` leaves, ``RepoDigests`` included. What is
shown is dao's own display, fed by the engine's progress messages.

Anything else (an image of another registry, an engine whose first mirror is something else, ``--mirror``,
``--verify-upstream``, ``--load``) takes the load path of :mod:`dao.pull.run`, which says why.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from dao.engine import Engine
from dao.oci.reference import DOCKER_HUB_DOMAIN, Reference
from dao.pull.output import finish, progress_bars
from dao.registry.dockerconfig import credentials_for

if TYPE_CHECKING:
    from rich.progress import TaskID

INFO_PATH = "/_dao/local"  # what a local accelerator answers (see dao.mirror.local)
PROBE_TIMEOUT = 2.0
LINES = ("Already exists", "Pull complete")  # the engine's messages that docker, too, leaves as lines


async def local_accelerator(session: aiohttp.ClientSession, mirrors: tuple[str, ...]) -> str | None:
    """The engine's first mirror when it is a local accelerator (the engine asks its mirrors in order, so
    only the first one says where its pulls go)."""
    if not mirrors:
        return None
    url = mirrors[0].rstrip("/")
    try:
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT)
        async with session.get(url + INFO_PATH, timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                return None
            doc = json.loads(await resp.read())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return url if isinstance(doc, dict) and doc.get("local") is True else None


def why_not(ref: Reference, accelerator: str | None, *, mirrors: bool, verify_upstream: bool, load: bool) -> str:
    """Why the engine's own pull is not taken ("" when it is)."""
    if load:
        return "--load"
    if ref.domain != DOCKER_HUB_DOMAIN:
        return f"the engine sends only Docker Hub images to its mirrors, not {ref.domain} ones"
    if accelerator is None:
        return "the engine's first registry mirror is not a local accelerator (dao mirror use --local)"
    if mirrors:
        return "--mirror names the sources"
    if verify_upstream:
        return "--verify-upstream"
    return ""


def registry_auth(ref: Reference, warn: Callable[[str], None]) -> str | None:
    """The X-Registry-Auth of the user's ``docker login`` for the image's registry, as the docker CLI sends it."""
    creds = credentials_for(ref.domain, warn=warn)
    if creds is None:
        return None
    doc = {"username": creds.username, "password": creds.password, "serveraddress": ref.domain}
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode()


async def engine_pull(
    engine: Engine,
    ref: Reference,
    platform: str | None,
    *,
    quiet: bool,
    bars: bool,
    out: Callable[[str], None],
    warn: Callable[[str], None],
    accelerator: str,
) -> int:
    """The engine pulls ``ref`` through the accelerator; docker's lines (or bars) as it goes."""
    name = dataclasses.replace(ref, tag=None, digest=None).familiar()
    reference = str(ref.digest) if ref.digest is not None else (ref.tag or "latest")
    progress = progress_bars() if bars and not quiet else None
    tasks: dict[str, TaskID] = {}
    digest, status = "", ""
    source = accelerator.split("://", 1)[-1]
    if progress is not None:
        progress.start()
    try:
        async for msg in engine.pull(name, reference, platform=platform, auth=registry_auth(ref, warn)):
            text, layer = str(msg.get("status", "")), str(msg.get("id", ""))
            if text.startswith("Digest: "):
                digest = text.removeprefix("Digest: ")
            elif text.startswith("Status: "):
                status = text.removeprefix("Status: ")
            elif progress is not None and layer and text in ("Downloading", "Download complete", "Pull complete"):
                _bar(progress, tasks, layer, msg, source)
            elif not quiet and (text.startswith("Pulling from ") or (progress is None and text in LINES)):
                out(f"{layer}: {text}")
    finally:
        if progress is not None:
            progress.stop()
    finish(out, quiet, digest, status, ref)
    return 0


def _bar(progress: Any, tasks: dict[str, TaskID], layer: str, msg: dict[str, Any], source: str) -> None:
    detail = msg.get("progressDetail") or {}
    total = detail.get("total")
    if layer not in tasks:
        tasks[layer] = progress.add_task(layer, total=total or None, source=source)
    task = tasks[layer]
    if msg.get("status") == "Downloading" and isinstance(detail.get("current"), int):
        progress.update(task, completed=detail["current"], total=total or None)
    else:  # done: the bar full
        for shown in progress.tasks:
            if shown.id == task and shown.total:
                progress.update(task, completed=shown.total)
