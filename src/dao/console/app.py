"""The console as one aiohttp application: the agents' routes (:mod:`dao.console.agents`), the accounts
(:mod:`dao.console.auth`), the user's JSON API (:mod:`dao.console.api`) and the pages that use it
(:mod:`dao.console.pages`), over one store and one hub."""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import AsyncIterator

from aiohttp import WSCloseCode, web

from dao.console import accelerator_web, agents, api, auth, capsules_web, install, pages
from dao.console.accelerator import Accelerator, Settings
from dao.console.agents import HUB_KEY, STORE_KEY
from dao.console.apps import web as apps_web
from dao.console.hub import Hub
from dao.console.peers import PEERING_KEY, Peering
from dao.console.store import Store
from dao.console.users import Users
from dao.mirror.accounts import Accounts

log = logging.getLogger("dao.console")

MAX_BODY = 1024 * 1024  # a form, a label set, a clean plan's ID: nothing the console takes is bigger


def make_app(
    store: Store,
    accounts: Accounts,
    *,
    ping_interval: float = 10.0,
    public_url: str = "",
    signup: bool = True,
    secret: bytes | None = None,
    accelerator: Settings | None = None,
    host_grace: float = 60.0,
    min_ready: float = 5.0,
    migrate_lead: float = 600.0,
    capsules_per_user: int = 2,
    redis: str = "",
) -> web.Application:
    """``redis``: this process is one node of several (``dao.console.relay``)."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[auth.sessions])
    app[STORE_KEY] = store
    app[HUB_KEY] = Hub(ping_interval)
    users = app[auth.USERS_KEY] = Users(store.engine, accounts)
    app[api.PUBLIC_URL_KEY] = public_url.rstrip("/")
    app[auth.SIGNUP_KEY] = signup
    agents.add_routes(app)
    auth.add_routes(app)
    api.add_routes(app)
    pages.setup(app)
    install.setup(app)
    capsules = capsules_web.setup(app, per_user=capsules_per_user)
    app[api.CAPSULE_ENDS_KEY] = capsules.ends
    apps_web.setup(
        app,
        host_grace=host_grace,
        min_ready=min_ready,
        migrate_lead=migrate_lead,
        capsules=capsules,
        console_url=public_url.rstrip("/"),
    )
    secret = secret or secrets.token_bytes(32)
    accelerator_web.setup(app, Accelerator(users, secret, accelerator or Settings("", 0)))
    app[PEERING_KEY] = Peering(app[HUB_KEY], secret)

    async def close_channels(app: web.Application) -> None:
        for ws in list(app[HUB_KEY].channels.values()):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"console stopping")

    app.on_shutdown.append(close_channels)
    if redis:
        app.cleanup_ctx.insert(0, functools.partial(_relaying, redis))  # (before the scheduler starts)
    return app


async def _relaying(url: str, app: web.Application) -> AsyncIterator[None]:
    from dao.console.relay import Relay

    hub = app[HUB_KEY]
    relay = Relay(url, hub)
    await relay.start()
    hub.relay = relay
    yield
    hub.relay = None
    await relay.aclose()
