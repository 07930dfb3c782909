"""``GET /install.sh`` and ``GET /dist/<wheel>``: what a new host fetches from the console, so that it needs
nothing else but the package index for dao's dependencies. The script is ``install.sh`` beside this file
with the console's URL filled in; the wheel is built when the console starts (:mod:`dao.console.wheel`)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from aiohttp import web

from dao import __version__
from dao.console import wheel
from dao.console.api import public_url

SCRIPT = Path(__file__).with_name("install.sh")
WHEEL_KEY = web.AppKey("wheel", Path)


async def install_script(request: web.Request) -> web.Response:
    text = SCRIPT.read_text()
    for name, value in (("CONSOLE", public_url(request)), ("WHEEL", wheel.wheel_name()), ("VERSION", __version__)):
        text = text.replace(f"@{name}@", value)
    return web.Response(text=text, content_type="text/x-shellscript", headers={"Cache-Control": "no-store"})


async def dist(request: web.Request) -> web.StreamResponse:
    built = request.app.get(WHEEL_KEY)
    if built is None or request.match_info["name"] != built.name:
        raise web.HTTPNotFound(text=f"no such file; this console serves {wheel.wheel_name()}\n")
    return web.FileResponse(built, headers={"Content-Type": "application/octet-stream"})


def setup(app: web.Application) -> None:
    async def build(app: web.Application) -> None:
        where = Path(tempfile.mkdtemp(prefix="dao-console-dist-"))
        app[WHEEL_KEY] = await asyncio.to_thread(wheel.build, where)

    async def remove(app: web.Application) -> None:
        shutil.rmtree(app[WHEEL_KEY].parent, ignore_errors=True)

    app.on_startup.append(build)
    app.on_cleanup.append(remove)
    app.router.add_get("/install.sh", install_script)
    app.router.add_get("/dist/{name}", dist)
