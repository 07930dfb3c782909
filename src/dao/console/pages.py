"""The console's pages: server-rendered (Jinja2 through aiohttp-jinja2), each drawn from the same data its
JSON twin under ``/api/`` serves, which the page's script then uses to stay live (``static/console.js``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from dao import __version__
from dao.console import api
from dao.console.agents import STORE_KEY
from dao.console.apps.web import app_detail
from dao.console.auth import CSRF_KEY, login_required, redirect, session_of, signed_in
from dao.units import format_size

HERE = Path(__file__).parent


def render(request: web.Request, template: str, context: dict[str, Any], status: int = 200) -> web.Response:
    session = signed_in(request)
    base = {"csrf": request[CSRF_KEY], "session": session, "version": __version__}
    response = aiohttp_jinja2.render_template(template, request, {**base, **context}, status=status)
    response.headers["Cache-Control"] = "no-store"
    return response


async def login_page(request: web.Request) -> web.StreamResponse:
    if signed_in(request) is not None:
        return redirect("/")
    mode = "signup" if request.path == "/signup" else "login"
    return render(request, "login.html", {"mode": mode, "error": None})


@login_required
async def hosts_page(request: web.Request) -> web.Response:
    found = await asyncio.to_thread(request.app[STORE_KEY].hosts, session_of(request).user_id)
    return render(request, "hosts.html", {"hosts": [api.with_live(request, h) for h in found]})


@login_required
async def add_host_page(request: web.Request) -> web.Response:
    return render(request, "add_host.html", {"console": api.public_url(request)})


@login_required
async def host_page(request: web.Request) -> web.Response:
    try:
        found = await api.user_host(request)
    except web.HTTPNotFound:
        return render(request, "missing.html", {}, status=404)
    return render(request, "host.html", {"host": found})


@login_required
async def apps_page(request: web.Request) -> web.Response:
    return render(request, "apps.html", {})


@login_required
async def app_page(request: web.Request) -> web.Response:
    found = await app_detail(request)
    if found is None:
        return render(request, "missing.html", {}, status=404)
    return render(request, "app.html", {"app": found})


def setup(app: web.Application) -> None:
    env = aiohttp_jinja2.setup(
        app, loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=jinja2.select_autoescape(["html"])
    )
    env.filters["size"] = lambda n: format_size(int(n or 0))
    app.router.add_static("/static/", HERE / "static", name="static")
    app.router.add_get("/login", login_page)
    app.router.add_get("/signup", login_page)
    app.router.add_get("/", hosts_page)
    app.router.add_get("/hosts/add", add_host_page)
    app.router.add_get("/hosts/{host}", host_page)
    app.router.add_get("/apps", apps_page)
    app.router.add_get("/apps/{name}", app_page)
