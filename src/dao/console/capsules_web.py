"""The capsules' JSON API (the Add host page's "Free capsule host" button and ``dao capsule create`` use
it): make one, list yours."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from dao.console.agents import HUB_KEY, STORE_KEY
from dao.console.api import json_error, public_url
from dao.console.auth import USERS_KEY, login_required, session_of
from dao.console.capsules import CapsuleError, Capsules

CAPSULES_KEY = web.AppKey("capsules", Capsules)


@login_required
async def list_capsules(request: web.Request) -> web.Response:
    found = await asyncio.to_thread(request.app[CAPSULES_KEY].list, session_of(request).user_id)
    return web.json_response(found)


@login_required
async def create_capsule(request: web.Request) -> web.Response:
    try:
        made = await request.app[CAPSULES_KEY].create(session_of(request).user_id, public_url(request))
    except CapsuleError as exc:
        raise json_error(409, exc.message) from None
    return web.json_response(made, status=201)


def setup(app: web.Application, *, per_user: int = 2) -> Capsules:
    capsules = app[CAPSULES_KEY] = Capsules(
        app[STORE_KEY].engine, app[STORE_KEY], app[HUB_KEY], app[USERS_KEY], per_user=per_user
    )

    async def ending(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(app[CAPSULES_KEY].run())
        yield
        task.cancel()

    app.cleanup_ctx.append(ending)
    app.router.add_get("/api/capsules", list_capsules)
    app.router.add_post("/api/capsules", create_capsule)
    return capsules
