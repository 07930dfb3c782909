"""Who is asking, and whether a state-changing request is theirs: sessions, CSRF, sign-up and log-in.

- The session cookie (``dao_session``) is HttpOnly, SameSite=Lax, Secure over HTTPS, and stored only as a
  hash (:mod:`dao.console.users`).
- Every state-changing request (anything but GET, HEAD and OPTIONS) outside the agents' routes carries the
  CSRF token, as the form field ``csrf`` or the header ``X-CSRF-Token``: the session's, or before log-in the
  ``dao_csrf`` cookie's (double submit). A browser's ``Origin``, when sent, must be this console. Anything
  else is a 403 before a handler runs.
- The agents' routes (``/api/agent/``) use the host credential instead and take no cookie.
- A script may send ``Authorization: Bearer daoapi_...`` (``dao console api-token``) to the other ``/api/``
  routes: it acts as its user and needs no CSRF token (there is no cookie to ride on).
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from dao.console.users import API_TOKEN_PREFIX, AccountError, Session, Users

SESSION_COOKIE, CSRF_COOKIE = "dao_session", "dao_csrf"
SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
USERS_KEY = web.AppKey("users", Users)
SIGNUP_KEY = web.AppKey("signup", bool)  # anyone may make an account (dao console serve --no-signup: not)
SESSION_KEY = web.RequestKey("session", Session)  # set for a signed-in request
CSRF_KEY = web.RequestKey("csrf", str)  # the token this request's forms and calls must send back

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def refuse(request: web.Request, status: int, message: str) -> web.Response:
    if is_api(request):
        return web.json_response({"error": message}, status=status)
    return web.Response(status=status, text=f"{status}: {message}\n", content_type="text/plain")


@web.middleware
async def sessions(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/api/agent/"):
        return await handler(request)
    users = request.app[USERS_KEY]
    scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
    if scheme == "Bearer" and bearer.startswith(API_TOKEN_PREFIX) and is_api(request):
        # A script's API token: no cookie, so no forgery to guard against; a wrong token is a 401, not a guest.
        token_session = await asyncio.to_thread(users.by_api_token, bearer.strip()) if len(bearer) <= 100 else None
        if token_session is None:
            return refuse(request, 401, "unknown API token")
        request[SESSION_KEY] = token_session
        request[CSRF_KEY] = ""
        return await handler(request)
    cookie = request.cookies.get(SESSION_COOKIE, "")
    session = await asyncio.to_thread(users.session, cookie) if 0 < len(cookie) <= 100 else None
    anonymous = request.cookies.get(CSRF_COOKIE, "")
    if session is not None:
        request[SESSION_KEY] = session
        request[CSRF_KEY] = session.csrf
    else:
        request[CSRF_KEY] = anonymous if 20 <= len(anonymous) <= 100 else secrets.token_urlsafe(24)
    if request.method not in SAFE:
        why = await _forged(request)
        if why:
            return refuse(request, 403, why)
    response = await handler(request)
    if session is None and anonymous != request[CSRF_KEY] and not response.prepared:
        response.set_cookie(CSRF_COOKIE, request[CSRF_KEY], httponly=True, samesite="Strict", secure=request.secure)
    return response


async def _forged(request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.host:
        return "cross-origin request refused"
    sent = request.headers.get("X-CSRF-Token", "")
    if not sent and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        sent = str(form.get("csrf", ""))
    if not sent or not hmac.compare_digest(sent.encode(), request[CSRF_KEY].encode()):
        return "missing or wrong CSRF token (reload the page)"
    return None


def redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def signed_in(request: web.Request) -> Session | None:
    return request.get(SESSION_KEY)


def login_required(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        if signed_in(request) is None:
            if is_api(request):
                return refuse(request, 401, "sign in first")
            return redirect("/login")
        return await handler(request)

    return wrapped


def session_of(request: web.Request) -> Session:
    """The signed-in user (a handler behind :func:`login_required`)."""
    return request[SESSION_KEY]


def _start(request: web.Request, response: web.StreamResponse, cookie: str) -> web.StreamResponse:
    response.set_cookie(
        SESSION_COOKIE, cookie, httponly=True, samesite="Lax", secure=request.secure, max_age=14 * 24 * 3600
    )
    response.del_cookie(CSRF_COOKIE)
    return response


async def _credentials(request: web.Request) -> tuple[str, str]:
    if request.content_type == "application/json":
        try:
            doc = await request.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise AccountError('send {"name": ..., "password": ...}')
        name, password = doc.get("name"), doc.get("password")
    else:
        form = await request.post()
        name, password = form.get("name"), form.get("password")
    if not isinstance(name, str) or not isinstance(password, str):
        raise AccountError("give a name and a password")
    return name.strip().lower(), password


async def signup(request: web.Request) -> web.StreamResponse:
    users = request.app[USERS_KEY]
    if not request.app[SIGNUP_KEY]:
        return _form_error(request, "login", "sign-up is closed here: ask the console's admin for an account", 403)
    try:
        name, password = await _credentials(request)
        user_id, issued = await asyncio.to_thread(users.add, name, password)
    except AccountError as exc:
        return _form_error(request, "signup", exc.message)
    if issued is not None:  # a new accelerator user: their address is the console's to derive from now on
        from dao.console.accelerator_web import ACCELERATOR_KEY

        await asyncio.to_thread(request.app[ACCELERATOR_KEY].issue, user_id)
    cookie = await asyncio.to_thread(users.open_session, user_id)
    if is_api(request):
        return _start(request, web.json_response({"user": user_id, "name": name}, status=201), cookie)
    return _start(request, redirect("/hosts/add"), cookie)


async def login(request: web.Request) -> web.StreamResponse:
    users = request.app[USERS_KEY]
    try:
        name, password = await _credentials(request)
    except AccountError as exc:
        return _form_error(request, "login", exc.message)
    user_id = await asyncio.to_thread(users.check, name, password)
    if user_id is None:
        return _form_error(request, "login", "wrong name or password", status=401)
    cookie = await asyncio.to_thread(users.open_session, user_id)
    if is_api(request):
        return _start(request, web.json_response({"user": user_id, "name": name}), cookie)
    return _start(request, redirect("/"), cookie)


async def logout(request: web.Request) -> web.StreamResponse:
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        await asyncio.to_thread(request.app[USERS_KEY].close_session, cookie)
    response: web.StreamResponse = web.json_response({}) if is_api(request) else redirect("/login")
    response.del_cookie(SESSION_COOKIE)
    return response


def _form_error(request: web.Request, page: str, message: str, status: int = 400) -> web.StreamResponse:
    if is_api(request):
        return web.json_response({"error": message}, status=status)
    from dao.console.pages import render

    return render(request, "login.html", {"mode": page, "error": message}, status=status)


def add_routes(app: web.Application) -> None:
    for path, handler in (("signup", signup), ("login", login), ("logout", logout)):
        app.router.add_post(f"/{path}", handler)
        app.router.add_post(f"/api/{path}", handler)
