"""The engine's own pull, through this host's local accelerator (``dao mirror serve --local``).

When the engine's first ``registry-mirrors`` entry is a local accelerator, ``dao pull`` of a Docker Hub image
asks the engine to pull (``POST /images/create``) instead of fetching and loading the image itself: the
accelerator already fetches each blob from every source at once, the engine unpacks each layer as it
streams in, and the image it leaves is the one ``docker pull`` leaves, ``RepoDigests`` included. What is
shown is dao's own display, fed by the engine's progress messages.

Anything else (an image of another registry, an engine whose first mirror is something else, ``--mirror``,
``--verify-upstream``, ``--load``) takes the load path of :mod:`dao.pull.run`, which says why.

Two drivers of one :class:`Display`: :func:`engine_path`, the CLI's, on the standard library alone (the
command's start is most of what dao adds to a pull from a near mirror), and :func:`engine_pull`, for
``run.pull``'s asynchronous callers (the agent).
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dao.engine.api import resolve_host
from dao.engine.wire import WireEngine, reachable
from dao.oci.reference import DOCKER_HUB_DOMAIN, Reference
from dao.pull.options import PullOptions
from dao.pull.output import finish, progress_bars, warn
from dao.registry.dockerconfig import credentials_for

if TYPE_CHECKING:
    from rich.progress import TaskID

    from dao.engine import Engine

INFO_PATH = "/_dao/local"  # what a local accelerator answers (see dao.mirror.local)
PROBE_TIMEOUT = 2.0
LINES = ("Already exists", "Pull complete")  # the engine's messages that docker, too, leaves as lines


def local_accelerator(mirrors: tuple[str, ...]) -> str | None:
    """The engine's first mirror when it is a local accelerator (the engine asks its mirrors in order, so
    only the first one says where its pulls go). A blocking request of at most ``PROBE_TIMEOUT``: the
    asynchronous callers run it in a thread."""
    if not mirrors:
        return None
    url = mirrors[0].rstrip("/")
    split = urlsplit(url)
    if split.scheme not in ("http", "https") or not split.hostname:
        return None
    kind = http.client.HTTPSConnection if split.scheme == "https" else http.client.HTTPConnection
    conn = kind(split.hostname, split.port, timeout=PROBE_TIMEOUT)
    try:
        conn.request("GET", INFO_PATH)
        resp = conn.getresponse()
        if resp.status != 200:
            return None
        doc = json.loads(resp.read(64 * 1024))
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()
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


class Display:
    """docker's lines (or one bar per layer), fed the engine's progress messages one at a time."""

    def __init__(
        self, ref: Reference, *, quiet: bool, bars: bool, out: Callable[[str], None], accelerator: str
    ) -> None:
        self.ref, self.quiet, self.out = ref, quiet, out
        self.source = accelerator.split("://", 1)[-1]
        self.progress = progress_bars() if bars and not quiet else None
        self.tasks: dict[str, TaskID] = {}
        self.digest, self.status = "", ""
        if self.progress is not None:
            self.progress.start()

    def feed(self, msg: dict[str, Any]) -> None:
        text, layer = str(msg.get("status", "")), str(msg.get("id", ""))
        if text.startswith("Digest: "):
            self.digest = text.removeprefix("Digest: ")
        elif text.startswith("Status: "):
            self.status = text.removeprefix("Status: ")
        elif self.progress is not None and layer and text in ("Downloading", "Download complete", "Pull complete"):
            _bar(self.progress, self.tasks, layer, msg, self.source)
        elif not self.quiet and (text.startswith("Pulling from ") or (self.progress is None and text in LINES)):
            self.out(f"{layer}: {text}")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    def finish(self) -> int:
        finish(self.out, self.quiet, self.digest, self.status, self.ref)
        return 0


def _pull_args(ref: Reference) -> tuple[str, str]:
    """The image and the tag (or digest) ``POST /images/create`` names."""
    name = dataclasses.replace(ref, tag=None, digest=None).familiar()
    return name, str(ref.digest) if ref.digest is not None else (ref.tag or "latest")


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
    name, reference = _pull_args(ref)
    display = Display(ref, quiet=quiet, bars=bars, out=out, accelerator=accelerator)
    try:
        messages: AsyncIterator[dict[str, Any]] = engine.pull(
            name, reference, platform=platform, auth=registry_auth(ref, warn)
        )
        async for msg in messages:
            display.feed(msg)
    finally:
        display.stop()
    return display.finish()


def engine_path(options: PullOptions, out: Callable[[str], None]) -> int | str | None:
    """``dao pull`` by the engine's own pull, if it is the path for ``options``, on the standard library
    alone (see :mod:`dao.engine.wire`). Returns the exit status when it was; else why not, for the load path
    to say; None when only the load path can tell (``-o``, an engine with TLS)."""
    if options.output is not None:  # no engine needed: none asked
        return None
    host = resolve_host()
    if not reachable(host):
        return None
    ref = Reference.parse(options.reference)
    if options.load or ref.domain != DOCKER_HUB_DOMAIN:
        return why_not(
            ref, None, mirrors=bool(options.mirrors), verify_upstream=options.verify_upstream, load=options.load
        )
    engine = WireEngine(host)
    info = engine.negotiate()
    accelerator = local_accelerator(info.mirrors if options.engine_mirrors else ())
    why = why_not(ref, accelerator, mirrors=bool(options.mirrors), verify_upstream=options.verify_upstream, load=False)
    if why or accelerator is None:
        return why
    name, reference = _pull_args(ref)
    display = Display(ref, quiet=options.quiet, bars=options.progress, out=out, accelerator=accelerator)
    try:
        messages: Iterable[dict[str, Any]] = engine.pull(
            name, reference, platform=options.platform, auth=registry_auth(ref, warn)
        )
        for msg in messages:
            display.feed(msg)
    finally:
        display.stop()
    return display.finish()


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
