"""The Accelerator page and its JSON twin: the user's address and the command that points a host at it,
usage against quota, past months, quota requests; for admins, the requests waiting for an answer."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from dao.console.accelerator import Accelerator, QuotaError
from dao.console.api import json_error, read_body
from dao.console.auth import USERS_KEY, login_required, session_of
from dao.units import parse_size

ACCELERATOR_KEY = web.AppKey("accelerator", Accelerator)


async def view(request: web.Request) -> dict[str, Any]:
    return await asyncio.to_thread(request.app[ACCELERATOR_KEY].view, session_of(request).user_id)


@login_required
async def accelerator_json(request: web.Request) -> web.Response:
    return web.json_response(await view(request))


@login_required
async def reissue(request: web.Request) -> web.Response:
    """A new address; the old one stops working within the mirror's flush interval."""
    accel = request.app[ACCELERATOR_KEY]
    address = await asyncio.to_thread(accel.issue, session_of(request).user_id)
    return web.json_response({"address": accel.url(address)}, status=201)


@login_required
async def ask(request: web.Request) -> web.Response:
    body = await read_body(request)
    quota, reason = body.get("quota"), body.get("reason", "")
    try:
        wanted = parse_size(quota) if isinstance(quota, str) else quota
    except ValueError:
        wanted = None
    if isinstance(wanted, bool) or not isinstance(wanted, int) or not isinstance(reason, str):
        raise json_error(400, 'give {"quota": "100GiB", "reason": "..."}')
    try:
        accel, user = request.app[ACCELERATOR_KEY], session_of(request).user_id
        made = await asyncio.to_thread(accel.request, user, wanted, reason)
    except QuotaError as exc:
        raise json_error(409 if "waiting" in exc.message else 400, exc.message) from None
    return web.json_response(made, status=201)


def _admin(request: web.Request) -> None:
    if not session_of(request).admin:
        raise json_error(403, "only an admin of the console may do this")


@login_required
async def pending(request: web.Request) -> web.Response:
    _admin(request)
    rows = await asyncio.to_thread(request.app[ACCELERATOR_KEY].requests, None, "pending")
    names = await asyncio.to_thread(request.app[USERS_KEY].logins, {r["user_id"] for r in rows})
    return web.json_response([{**r, "user": names.get(r["user_id"], r["user_id"])} for r in rows])


@login_required
async def decide(request: web.Request) -> web.Response:
    _admin(request)
    verdict = request.match_info["verdict"]
    if verdict not in ("approve", "decline"):
        raise json_error(404, "approve or decline")
    accel = request.app[ACCELERATOR_KEY]
    try:
        done = await asyncio.to_thread(
            accel.decide, request.match_info["id"][:32], verdict == "approve", session_of(request).user_id
        )
    except QuotaError as exc:
        raise json_error(404 if "no such" in exc.message else 409, exc.message) from None
    return web.json_response(done)


@login_required
async def page(request: web.Request) -> web.Response:
    from dao.console.pages import render

    return render(request, "accelerator.html", {"accel": await view(request)})


def setup(app: web.Application, accelerator: Accelerator) -> None:
    app[ACCELERATOR_KEY] = accelerator
    r = app.router
    r.add_get("/accelerator", page)
    r.add_get("/api/accelerator", accelerator_json)
    r.add_post("/api/accelerator/address", reissue)
    r.add_post("/api/accelerator/quota-requests", ask)
    r.add_get("/api/admin/quota-requests", pending)
    r.add_post("/api/admin/quota-requests/{id}/{verdict}", decide)
