"""Capsule hosts, the console's side (``docs/hosts.md``): a free Docker host that lives ``ttl`` and then
vanishes, lent by a *provider* (``dao capsule serve``) that dialled the console like any agent, and whose
hello says ``provider``. A provider owned by an admin lends to every user; one owned by anyone else lends to
its owner only.

To make a capsule the console issues a one-time enrolment token for the user and asks a provider with room,
over its channel, to make one (``capsule.create``): the provider builds the host, and the agent in it enrols
with that token, so the capsule is the user's host like any other. The console keeps when each capsule
ends: the scheduler moves the apps off it ``--migrate-lead`` before, and at the end the console revokes the
host, so nothing of it can come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

from aiohttp import WSCloseCode
from sqlalchemy import Column, Float, MetaData, String, Table, Text, select, update
from sqlalchemy.engine import Engine

from dao.console.hub import Hub
from dao.console.store import Store
from dao.console.users import Users
from dao.errors import DaoError

log = logging.getLogger("dao.console.capsules")

metadata = MetaData()

capsules_table = Table(
    "console_capsules",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("user_id", String(63), nullable=False, index=True),
    Column("provider_id", String(32), nullable=False),
    Column("host_id", String(32)),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("ended_at", Float),
    Column("error", Text),
)

CREATE_WITHIN = 180.0  # seconds a provider may take to make a capsule (a dockerd start, an enrolment)
KEPT = 24 * 3600.0  # seconds an ended capsule is still listed


class CapsuleError(DaoError):
    pass


class Capsules:
    def __init__(self, engine: Engine, store: Store, hub: Hub, users: Users, *, per_user: int = 2) -> None:
        self.engine, self.store, self.hub, self.users = engine, store, hub, users
        self.per_user = per_user
        self.creating: set[str] = set()  # users with a capsule being made
        metadata.create_all(engine)
        self.ends = self.expiries()  # host ID -> its end, for every capsule not ended: the pages ask often

    # -- reading -------------------------------------------------------------------------------------------

    def list(self, user_id: str) -> list[dict[str, Any]]:
        t = capsules_table.c
        since = time.time() - KEPT
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(capsules_table).where(t.user_id == user_id, t.created_at > since).order_by(t.created_at)
            )
            return [self._view(r._mapping) for r in rows]

    @staticmethod
    def _view(row: Any) -> dict[str, Any]:
        return {
            "id": row["id"],
            "host": row["host_id"],
            "created_at": row["created_at"],
            "expires_at": row["expires_at"],
            "ended": row["ended_at"] is not None,
            "error": row["error"],
        }

    def expiries(self) -> dict[str, float]:
        """host ID -> when it ends, for the capsules not yet ended."""
        t = capsules_table.c
        query = select(t.host_id, t.expires_at).where(t.ended_at.is_(None), t.host_id.is_not(None))
        with self.engine.connect() as conn:
            return {r.host_id: r.expires_at for r in conn.execute(query)}

    def _active(self, conn: Any, column: Any, value: str) -> int:
        t = capsules_table.c
        rows = conn.execute(select(t.id).where(column == value, t.ended_at.is_(None), t.expires_at > time.time()))
        return len(rows.all())

    # -- making one ----------------------------------------------------------------------------------------

    def _provider_for(self, user_id: str) -> str | None:
        """The online provider with the most room that lends to this user."""
        hosts = [h for h in self.store.hosts() if h["online"] and self.hub.is_open(h["id"])]
        lenders = [h for h in hosts if isinstance(h["facts"].get("provider"), dict)]
        admins = self.users.admins({h["user"] for h in lenders})
        best, room = None, 0
        with self.engine.connect() as conn:
            for h in lenders:
                if h["user"] != user_id and h["user"] not in admins:
                    continue
                free = int(h["facts"]["provider"].get("max") or 0) - self._active(
                    conn, capsules_table.c.provider_id, h["id"]
                )
                if free > room:
                    best, room = h["id"], free
        return best

    async def create(self, user_id: str, console_url: str) -> dict[str, Any]:
        """A new capsule for the user, once its agent has enrolled (its host is the user's then)."""
        if user_id in self.creating:
            raise CapsuleError("a capsule is being made for you already")
        with self.engine.connect() as conn:
            if self._active(conn, capsules_table.c.user_id, user_id) >= self.per_user:
                raise CapsuleError(f"you have {self.per_user} capsule(s) already: that is the most at once")
        self.creating.add(user_id)
        try:
            provider = await asyncio.to_thread(self._provider_for, user_id)
            if provider is None:
                raise CapsuleError("no capsule provider has room now; try again later, or add a host of your own")
            token = await asyncio.to_thread(self.store.issue_token, user_id, CREATE_WITHIN + 60)
            capsule_id = secrets.token_hex(6)
            result = await self.hub.call(
                provider,
                "capsule.create",
                {"capsule": capsule_id, "token": token, "console": console_url},
                within=CREATE_WITHIN,
            )
            if not result.ok or not isinstance(result.data, dict):
                raise CapsuleError(f"the provider could not make a capsule: {result.data}")
            now = time.time()
            row = {
                "id": capsule_id,
                "user_id": user_id,
                "provider_id": provider,
                "host_id": str(result.data.get("host") or ""),
                "created_at": now,
                "expires_at": float(result.data.get("expires_at") or now),
                "ended_at": None,
                "error": None,
            }
            await asyncio.to_thread(self._insert, row)
            self.ends[row["host_id"]] = row["expires_at"]
            log.info("capsule %s (host %s) made for %s on %s", capsule_id, row["host_id"], user_id, provider)
            return self._view(row)
        finally:
            self.creating.discard(user_id)

    def _insert(self, row: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(capsules_table.insert().values(**row))

    # -- the end -------------------------------------------------------------------------------------------

    def _due(self) -> list[tuple[str, str | None]]:
        t = capsules_table.c
        now = time.time()
        with self.engine.begin() as conn:
            rows = conn.execute(select(t.id, t.host_id).where(t.ended_at.is_(None), t.expires_at <= now)).all()
            for r in rows:
                conn.execute(update(capsules_table).where(t.id == r.id).values(ended_at=now))
        return [(r.id, r.host_id) for r in rows]

    async def run(self, every: float = 2.0) -> None:
        """End the capsules whose time is up: their hosts revoked, their channels closed."""
        while True:
            await asyncio.sleep(every)
            try:
                if self.hub.relay is not None:  # other console nodes make capsules too: the table says which
                    self.ends = await asyncio.to_thread(self.expiries)
                    if not await self.hub.relay.leads():
                        continue  # the node that schedules ends them
                for capsule_id, host_id in await asyncio.to_thread(self._due):
                    self.ends.pop(host_id or "", None)
                    if host_id:
                        await asyncio.to_thread(self.store.revoke, host_id)
                        ws = self.hub.channels.get(host_id)
                        if ws is not None:
                            with contextlib.suppress(ConnectionError, RuntimeError):
                                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"the capsule expired")
                    log.info("capsule %s ended (host %s)", capsule_id, host_id)
            except Exception:  # one bad round must not end the loop
                log.exception("capsule expiry")
