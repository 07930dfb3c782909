"""The signed-in user's JSON API, which the pages use and scripts may too (``docs/console.md``).

Every route under ``/api/hosts/{host}`` first finds the host among the caller's own: another user's host and
a host that does not exist get the same 404, so IDs cannot be probed. Commands go to the agent over its
channel (:class:`dao.console.hub.Hub`); an offline host is a 409 at once, never a queued surprise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSCloseCode, web

from dao.channel.frames import Result
from dao.console.agents import HUB_KEY, STORE_KEY
from dao.console.auth import CSRF_KEY, login_required, session_of, signed_in
from dao.console.hub import CommandTimeout, HostOffline
from dao.errors import DaoError

CONTAINER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
REFERENCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,511}")
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
LABELS_MAX = 32
ACTIONS = ("start", "stop", "restart", "remove")
RANGES = {"1h": 3600, "1d": 86400}
CHART_POINTS = 720
PLAN_TTL = 3600.0  # seconds a clean plan shown in a page may be applied
KEEPALIVE = 15.0  # seconds between comments on an idle event stream (a proxy closes a silent one)
CAPSULE_ENDS_KEY = web.AppKey("capsule_ends", dict)  # host ID -> when the capsule ends (Capsules.ends)
PUBLIC_URL_KEY = web.AppKey("public_url", str)  # the console's URL as hosts reach it; "" = as the page came


def json_error(status: int, message: str) -> web.HTTPException:
    cls = {
        400: web.HTTPBadRequest,
        401: web.HTTPUnauthorized,
        403: web.HTTPForbidden,
        404: web.HTTPNotFound,
        409: web.HTTPConflict,
        504: web.HTTPGatewayTimeout,
    }
    return cls[status](text=json.dumps({"error": message}), content_type="application/json")


async def read_body(request: web.Request) -> dict[str, Any]:
    try:
        doc = await request.json()
    except ValueError:
        raise json_error(400, "the body must be a JSON object") from None
    if not isinstance(doc, dict):
        raise json_error(400, "the body must be a JSON object")
    return doc


async def user_host(request: web.Request) -> dict[str, Any]:
    """The caller's host named in the path, with what its agent last reported; 404 for anyone else's."""
    user = session_of(request).user_id
    host_id = request.match_info["host"]
    found = await asyncio.to_thread(request.app[STORE_KEY].hosts, user, host_id) if len(host_id) <= 32 else []
    if not found:
        raise json_error(404, "no such host")
    return with_live(request, found[0])


def with_live(request: web.Request, host: dict[str, Any]) -> dict[str, Any]:
    live = request.app[HUB_KEY].live.get(host["id"])
    state = live.state if live else None
    containers = state.containers if state else []
    return {
        **host,
        "containers": containers,
        "images": state.images if state else [],
        "disk_use": state.disk if state else {},
        "events": list(live.events) if live else [],
        "counts": {"running": sum(1 for c in containers if c.get("state") == "running"), "total": len(containers)},
        "expires_at": request.app[CAPSULE_ENDS_KEY].get(host["id"]),  # a capsule's end, else None
    }


def public_url(request: web.Request) -> str:
    return request.app[PUBLIC_URL_KEY] or str(request.url.origin())


def install_command(console: str, token: str) -> str:
    return f"curl -fsSL {console}/install.sh | sudo sh -s -- {token}"


async def _command(request: web.Request, host_id: str, op: str, args: dict[str, Any], within: float = 60.0) -> Any:
    try:
        result = await request.app[HUB_KEY].call(host_id, op, args, within=within)
    except HostOffline as exc:
        raise json_error(409, exc.message) from None
    except CommandTimeout as exc:
        raise json_error(504, exc.message) from None
    except DaoError as exc:
        raise json_error(400, exc.message) from None
    if not result.ok:
        raise json_error(409, str(result.data))
    return result.data


async def _relayed(
    request: web.Request, host_id: str, op: str, args: dict[str, Any], send: Callable[[str], Awaitable[None]]
) -> Result:
    """Run a streaming command, handing each piece of its output to ``send`` in order, until its result. If
    ``send`` fails (the page went away), the command is cancelled at the agent."""
    pieces: asyncio.Queue[str] = asyncio.Queue()
    call = asyncio.ensure_future(request.app[HUB_KEY].call(host_id, op, args, within=None, on_stream=pieces.put_nowait))
    try:
        while True:
            got = asyncio.ensure_future(pieces.get())
            await asyncio.wait({call, got}, timeout=KEEPALIVE, return_when=asyncio.FIRST_COMPLETED)
            if got.done():
                await send(got.result())
                continue
            got.cancel()
            if call.done():
                while not pieces.empty():
                    await send(pieces.get_nowait())
                return call.result()
            await send("")  # a keep-alive, and the way to learn that the page has gone
    finally:
        call.cancel()
        with contextlib.suppress(BaseException):
            await call


# -- routes ----------------------------------------------------------------------------------------------------


async def me(request: web.Request) -> web.Response:
    """Who is signed in, and the CSRF token this session's state-changing calls must send (before log-in:
    the token the log-in must send)."""
    s = signed_in(request)
    if s is None:
        return web.json_response({"user": None, "csrf": request[CSRF_KEY]})
    return web.json_response({"user": s.user_id, "name": s.login, "admin": s.admin, "csrf": s.csrf})


@login_required
async def hosts(request: web.Request) -> web.Response:
    found = await asyncio.to_thread(request.app[STORE_KEY].hosts, session_of(request).user_id)
    return web.json_response([with_live(request, h) for h in found])


@login_required
async def enroll_token(request: web.Request) -> web.Response:
    token = await asyncio.to_thread(request.app[STORE_KEY].issue_token, session_of(request).user_id)
    console = public_url(request)
    return web.json_response(
        {"token": token, "expires_in": 24 * 3600, "console": console, "command": install_command(console, token)},
        status=201,
    )


@login_required
async def host(request: web.Request) -> web.Response:
    return web.json_response(await user_host(request))


@login_required
async def samples(request: web.Request) -> web.Response:
    found = await user_host(request)
    span = RANGES.get(request.query.get("range", "1h"))
    if span is None:
        raise json_error(400, f"range is one of {', '.join(RANGES)}")
    rows = await asyncio.to_thread(request.app[STORE_KEY].samples, found["id"], time.time() - span, CHART_POINTS)
    return web.json_response({"range": request.query.get("range", "1h"), "samples": rows})


@login_required
async def container_action(request: web.Request) -> web.Response:
    found = await user_host(request)
    container, action = request.match_info["container"], request.match_info["action"]
    if action not in ACTIONS or not CONTAINER.fullmatch(container):
        raise json_error(404, "no such container action")
    args: dict[str, Any] = {"id": container}
    if "grace" in request.query and action in ("stop", "restart"):  # seconds before SIGKILL (docker stop -t)
        try:
            args["grace"] = int(request.query["grace"])
        except ValueError:
            raise json_error(400, "grace is a whole number of seconds") from None
    return web.json_response(await _command(request, found["id"], f"container.{action}", args))


@login_required
async def container_logs(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``data`` with each piece of output (JSON strings), ``end`` when the container's
    output ends, ``failed`` when the agent refuses."""
    found = await user_host(request)
    container = request.match_info["container"]
    if not CONTAINER.fullmatch(container):
        raise json_error(404, "no such container")
    if not request.app[HUB_KEY].is_open(found["id"]):
        raise json_error(409, "the host is offline")
    response = await _event_stream(request)

    async def send(text: str) -> None:
        await response.write(f"data: {json.dumps(text)}\n\n".encode() if text else b": keep-alive\n\n")

    try:
        result = await _relayed(request, found["id"], "container.logs", {"id": container, "follow": True}, send)
        kind = "end" if result.ok else "failed"
        await response.write(f"event: {kind}\ndata: {json.dumps(result.data)}\n\n".encode())
    except (ConnectionError, HostOffline):
        pass
    return response


@login_required
async def pull(request: web.Request) -> web.StreamResponse:
    """dao pull on the host. The answer is NDJSON: ``{"output": line}`` as the pull prints, then
    ``{"ok": ..., "result": ...}``."""
    found = await user_host(request)
    ref = (await read_body(request)).get("ref")
    if not isinstance(ref, str) or not REFERENCE.fullmatch(ref.strip()):
        raise json_error(400, "give an image reference, e.g. debian:12")
    if not request.app[HUB_KEY].is_open(found["id"]):
        raise json_error(409, "the host is offline")
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"})
    await response.prepare(request)

    async def send(text: str) -> None:
        await response.write((json.dumps({"output": text}) + "\n").encode() if text else b"\n")

    try:
        result = await _relayed(request, found["id"], "image.pull", {"ref": ref.strip()}, send)
        await response.write((json.dumps({"ok": result.ok, "result": result.data}) + "\n").encode())
    except HostOffline as exc:
        await response.write((json.dumps({"ok": False, "result": exc.message}) + "\n").encode())
    except ConnectionError:
        pass
    return response


class Plans:
    """Clean plans shown to a user, by ID, so that "apply" applies exactly the plan that was shown."""

    def __init__(self) -> None:
        self._plans: dict[str, tuple[str, float, dict[str, Any]]] = {}

    def keep(self, host_id: str, plan: dict[str, Any]) -> str:
        now = time.time()
        self._plans = {k: v for k, v in self._plans.items() if now - v[1] < PLAN_TTL}
        plan_id = secrets.token_hex(8)
        self._plans[plan_id] = (host_id, now, plan)
        return plan_id

    def take(self, host_id: str, plan_id: str) -> dict[str, Any] | None:
        found = self._plans.get(plan_id)
        if found is None or found[0] != host_id or time.time() - found[1] >= PLAN_TTL:
            return None
        del self._plans[plan_id]
        return found[2]


PLANS_KEY = web.AppKey("plans", Plans)


@login_required
async def clean_plan(request: web.Request) -> web.Response:
    found = await user_host(request)
    args = {}
    if request.can_read_body:  # {"grace": seconds}: younger garbage is spared (default: an hour, as dao clean)
        grace = (await read_body(request)).get("grace")
        if grace is not None:
            args["grace"] = grace
    plan = await _command(request, found["id"], "clean.plan", args, within=120)
    return web.json_response({"plan_id": request.app[PLANS_KEY].keep(found["id"], plan), "plan": plan})


@login_required
async def clean_apply(request: web.Request) -> web.Response:
    found = await user_host(request)
    plan_id = (await read_body(request)).get("plan_id")
    plan = request.app[PLANS_KEY].take(found["id"], plan_id) if isinstance(plan_id, str) else None
    if plan is None:
        raise json_error(404, "no such plan (plans are kept an hour, and applied once): make a new one")
    return web.json_response(await _command(request, found["id"], "clean.apply", {"plan": plan}, within=600))


@login_required
async def labels(request: web.Request) -> web.Response:
    found = await user_host(request)
    given = (await read_body(request)).get("labels")
    if not isinstance(given, dict) or len(given) > LABELS_MAX:
        raise json_error(400, f"labels is an object of at most {LABELS_MAX} key: value strings")
    for key, value in given.items():
        if not LABEL_KEY.fullmatch(key) or not isinstance(value, str) or len(value) > 200:
            raise json_error(400, f"bad label {str(key)[:64]!r}: a key of a-z, 0-9, '._/-' and a value of text")
    await asyncio.to_thread(request.app[STORE_KEY].set_labels, found["id"], given)
    return web.json_response({"labels": given})


@login_required
async def revoke(request: web.Request) -> web.Response:
    found = await user_host(request)
    await asyncio.to_thread(request.app[STORE_KEY].revoke, found["id"])
    ws = request.app[HUB_KEY].channels.get(found["id"])
    if ws is not None:
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"this host was revoked")
    return web.json_response({"revoked": found["id"]})


STREAMS_KEY = web.AppKey("streams", set)  # the tasks of the open event streams, ended when the console stops


async def _event_stream(request: web.Request) -> web.StreamResponse:
    """An open-ended answer: its task is ended when the console stops (it would never end by itself)."""
    task = asyncio.current_task()
    if task is not None:
        streams = request.app[STREAMS_KEY]
        streams.add(task)
        task.add_done_callback(streams.discard)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    return response


@login_required
async def live(request: web.Request) -> web.StreamResponse:
    """Server-sent events of the caller's hosts: ``online``, ``offline``, ``metrics``, ``state``, ``event``
    (each a JSON ``data`` with ``kind`` and ``host``); ``reload`` when the page fell too far behind."""
    user = session_of(request).user_id
    hub = request.app[HUB_KEY]
    queue = hub.subscribe(user)
    response = await _event_stream(request)
    try:
        await response.write(b": connected\n\n")
        while True:
            try:
                async with asyncio.timeout(KEEPALIVE):
                    message = await queue.get()
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            await response.write(f"data: {json.dumps(message)}\n\n".encode())
    except ConnectionError:
        pass
    finally:
        hub.unsubscribe(user, queue)
    return response


def add_routes(app: web.Application) -> None:
    app[PLANS_KEY] = Plans()
    app[STREAMS_KEY] = set()

    async def end_streams(app: web.Application) -> None:
        for task in list(app[STREAMS_KEY]):
            task.cancel()

    app.on_shutdown.append(end_streams)
    r = app.router
    r.add_get("/api/me", me)
    r.add_get("/api/hosts", hosts)
    r.add_post("/api/hosts/enroll-token", enroll_token)
    r.add_get("/api/hosts/{host}", host)
    r.add_get("/api/hosts/{host}/samples", samples)
    r.add_post("/api/hosts/{host}/containers/{container}/{action}", container_action)
    r.add_get("/api/hosts/{host}/containers/{container}/logs", container_logs)
    r.add_post("/api/hosts/{host}/pull", pull)
    r.add_post("/api/hosts/{host}/clean/plan", clean_plan)
    r.add_post("/api/hosts/{host}/clean/apply", clean_apply)
    r.add_put("/api/hosts/{host}/labels", labels)
    r.add_post("/api/hosts/{host}/revoke", revoke)
    r.add_get("/api/live", live)
