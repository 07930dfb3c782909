"""The apps' JSON API (the Apps page and ``dao app`` come next): create or update an app from a compose file,
list them with where each replica runs, delete one. The reconcile loop does the rest."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from dao.console.agents import HUB_KEY, STORE_KEY
from dao.console.api import json_error, read_body
from dao.console.apps.compose import MAX_REPLICAS, ComposeError
from dao.console.apps.store import Apps
from dao.console.auth import login_required, session_of
from dao.console.capsules import Capsules
from dao.console.scheduler.loop import Reconciler

APPS_KEY = web.AppKey("apps", Apps)
RECONCILER_KEY = web.AppKey("reconciler", Reconciler)
APP_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def _view(request: web.Request, row: dict[str, Any]) -> dict[str, Any]:
    apps, hub, loop = request.app[APPS_KEY], request.app[HUB_KEY], request.app[RECONCILER_KEY]
    app = apps.parsed(row["compose"])
    placed: dict[str, list[dict[str, Any]]] = {name: [] for name in app.services}
    owned = {h for h, owner in hub.owners.items() if owner == row["user_id"]}  # the owner's hosts, not all
    ready = {(r.host, r.container): r.ready for r in loop.replicas_of(owned)}
    for host_id in owned:
        live = hub.live.get(host_id)
        if live is None or live.state is None:
            continue
        for c in live.state.containers:
            labels = c.get("labels") or {}
            service = app.services.get(labels.get("dao.service", ""))
            if labels.get("dao.app") != row["id"] or service is None:
                continue
            name = str(c.get("name"))
            draining = loop.is_draining(host_id, name)
            serving = ready.get((host_id, name), False) and not draining
            address = hub.addresses.get(host_id, "")
            placed[service.name].append(
                {
                    "replica": int(labels.get("dao.replica", -1)),
                    "host": host_id,
                    "container": name,
                    "state": c.get("state"),
                    "status": c.get("status"),
                    "ready": ready.get((host_id, name), False),
                    "draining": draining,
                    # where a client reaches it: the host's address as the console saw it dial, and each
                    # published TCP port (with the host network, the container's own)
                    "endpoints": [f"{address}:{p.host or p.container}" for p in service.ports if p.protocol == "tcp"]
                    if serving and address
                    else [],
                }
            )
    pending = loop.pending.get(row["id"], [])
    count = apps.wanted(row)
    return {
        "name": row["name"],
        "id": row["id"],
        "compose": row["compose"],
        "updated_at": row["updated_at"],
        "stopped": bool(row.get("stopped")),
        "services": {
            name: {
                "image": s.image,
                "replicas": count[name],
                "file_replicas": s.replicas,
                "placed": sorted(placed[name], key=lambda p: p["replica"]),
                "pending": [{"replica": p.index, "why": p.why} for p in pending if p.service == name],
            }
            for name, s in app.services.items()
        },
        "errors": loop.errors(row["id"]),
    }


@login_required
async def list_apps(request: web.Request) -> web.Response:
    rows = await asyncio.to_thread(request.app[APPS_KEY].list, session_of(request).user_id)
    return web.json_response([_view(request, r) for r in rows])


@login_required
async def put_app(request: web.Request) -> web.Response:
    body = await read_body(request)
    name = request.match_info.get("name") or body.get("name")
    compose = body.get("compose")
    if not isinstance(name, str) or not APP_NAME.fullmatch(name):
        raise json_error(400, "an app's name is a-z, 0-9, '_' and '-', up to 63")
    if not isinstance(compose, str):
        raise json_error(400, 'give the compose file as {"compose": "services: ..."}')
    try:
        row = await asyncio.to_thread(request.app[APPS_KEY].put, session_of(request).user_id, name, compose)
    except ComposeError as exc:
        raise json_error(400, exc.message) from None
    return web.json_response(_view(request, row), status=201 if request.method == "POST" else 200)


async def app_detail(request: web.Request) -> dict[str, Any] | None:
    """The caller's app named in the path with its history (every compose file it had) and its latest
    events; None for no such app of theirs."""
    apps = request.app[APPS_KEY]
    row = await asyncio.to_thread(apps.get, session_of(request).user_id, request.match_info["name"])
    if row is None:
        return None
    return {
        **_view(request, row),
        "versions": await asyncio.to_thread(apps.versions, row["id"]),
        "events": await asyncio.to_thread(apps.events, row["id"]),
    }


@login_required
async def get_app(request: web.Request) -> web.Response:
    found = await app_detail(request)
    if found is None:
        raise json_error(404, "no such app")
    return web.json_response(found)


async def _own(request: web.Request) -> dict[str, Any]:
    row = await asyncio.to_thread(request.app[APPS_KEY].get, session_of(request).user_id, request.match_info["name"])
    if row is None:
        raise json_error(404, "no such app")
    return row


@login_required
async def scale_app(request: web.Request) -> web.Response:
    """``{"replicas": {"web": 3}}``: replicas per service over the file's, until the next file."""
    row = await _own(request)
    body = await read_body(request)
    apps = request.app[APPS_KEY]
    services = apps.parsed(row["compose"]).services
    scale = body.get("replicas")
    if not isinstance(scale, dict) or not scale:
        raise json_error(400, 'give the replicas per service: {"replicas": {"web": 3}}')
    for name, n in scale.items():
        if name not in services:
            raise json_error(400, f"{row['name']} has no service {name!r} (it has {', '.join(services)})")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_REPLICAS:
            raise json_error(400, f"replicas of {name}: a whole number from 0 to {MAX_REPLICAS}")
    await asyncio.to_thread(apps.set_scale, row["id"], scale)
    await asyncio.to_thread(apps.add_event, row["id"], "scaled: " + ", ".join(f"{k}={v}" for k, v in scale.items()))
    return web.json_response(_view(request, await _own(request)))


def _stopping(stopped: bool) -> Any:
    @login_required
    async def handler(request: web.Request) -> web.Response:
        row = await _own(request)
        apps = request.app[APPS_KEY]
        await asyncio.to_thread(apps.set_stopped, row["id"], stopped)
        await asyncio.to_thread(apps.add_event, row["id"], "stopped: every replica removed" if stopped else "started")
        return web.json_response(_view(request, await _own(request)))

    return handler


@login_required
async def delete_app(request: web.Request) -> web.Response:
    done = await asyncio.to_thread(
        request.app[APPS_KEY].delete, session_of(request).user_id, request.match_info["name"]
    )
    if not done:
        raise json_error(404, "no such app")
    return web.json_response({"deleted": request.match_info["name"]})


def setup(
    app: web.Application,
    *,
    host_grace: float = 60.0,
    min_ready: float = 5.0,
    interval: float = 2.0,
    migrate_lead: float = 600.0,
    capsules: Capsules | None = None,
    console_url: str = "",
) -> None:
    apps = Apps(app[STORE_KEY].engine)
    app[APPS_KEY] = apps
    app[RECONCILER_KEY] = Reconciler(
        app[STORE_KEY],
        apps,
        app[HUB_KEY],
        interval=interval,
        host_grace=host_grace,
        min_ready=min_ready,
        expiry_lead=migrate_lead,
        capsules=capsules,
        console_url=console_url,
    )

    async def reconciling(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(app[RECONCILER_KEY].run())
        yield
        task.cancel()

    app.cleanup_ctx.append(reconciling)
    r = app.router
    r.add_get("/api/apps", list_apps)
    r.add_post("/api/apps", put_app)
    r.add_get("/api/apps/{name}", get_app)
    r.add_put("/api/apps/{name}", put_app)
    r.add_delete("/api/apps/{name}", delete_app)
    r.add_post("/api/apps/{name}/scale", scale_app)
    r.add_post("/api/apps/{name}/stop", _stopping(True))
    r.add_post("/api/apps/{name}/start", _stopping(False))
