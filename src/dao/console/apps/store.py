"""The apps: each a compose file (kept as the user wrote it) under a name of its owner's. Its ID, not its
name, labels its containers (``dao.app``), so two users' apps of one name never meet on a host."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from dao.console.apps.compose import App, ComposeError, parse

metadata = MetaData()

apps_table = Table(
    "console_apps",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("user_id", String(63), nullable=False, index=True),
    Column("name", String(63), nullable=False),
    Column("compose", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("scale", Text, nullable=False, default="{}"),  # service -> replicas, over the file's (dao app scale)
    Column("stopped", Boolean, nullable=False, default=False),  # every service at 0, the spec kept (dao app stop)
    UniqueConstraint("user_id", "name"),
)

# What happened to each app, for its page: each compose file it had (its history) and the scheduler's doings.
versions_table = Table(
    "console_app_versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("app_id", String(16), nullable=False, index=True),
    Column("at", Float, nullable=False),
    Column("compose", Text, nullable=False),
)

events_table = Table(
    "console_app_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("app_id", String(16), nullable=False, index=True),
    Column("at", Float, nullable=False),
    Column("text", Text, nullable=False),
)
EVENTS_KEPT = 500  # per app; older ones go as new ones come


class Apps:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        metadata.create_all(engine)
        columns = {c["name"] for c in inspect(engine).get_columns(apps_table.name)}
        with engine.begin() as conn:  # a database from before scale and stop
            if "scale" not in columns:
                conn.execute(text(f"ALTER TABLE {apps_table.name} ADD COLUMN scale TEXT NOT NULL DEFAULT '{{}}'"))
            if "stopped" not in columns:
                conn.execute(text(f"ALTER TABLE {apps_table.name} ADD COLUMN stopped BOOLEAN NOT NULL DEFAULT FALSE"))
        self._parsed: dict[str, App] = {}  # by compose text: parsing is not free, and the loop asks often

    def parsed(self, compose: str) -> App:
        found = self._parsed.get(compose)
        if found is None:
            found = self._parsed[compose] = parse(compose)
            if len(self._parsed) > 1000:
                self._parsed.pop(next(iter(self._parsed)))
        return found

    def put(self, user_id: str, name: str, compose: str) -> dict[str, Any]:
        """Create the app, or give it a new compose file; the file is checked first (ComposeError)."""
        self.parsed(compose)
        now = time.time()
        t = apps_table
        with self.engine.begin() as conn:
            # A new file is the whole truth again: what scale and stop had set over the old one goes.
            done = conn.execute(
                update(t)
                .where(t.c.user_id == user_id, t.c.name == name)
                .values(compose=compose, updated_at=now, scale="{}", stopped=False)
            )
            if done.rowcount == 0:
                try:
                    conn.execute(
                        t.insert().values(
                            id=secrets.token_hex(6),
                            user_id=user_id,
                            name=name,
                            compose=compose,
                            created_at=now,
                            updated_at=now,
                        )
                    )
                except IntegrityError:
                    raise ComposeError(f"an app named {name!r} was made at the same moment") from None
            app_id = conn.execute(select(t.c.id).where(t.c.user_id == user_id, t.c.name == name)).scalar_one()
            last = conn.execute(
                select(versions_table.c.compose)
                .where(versions_table.c.app_id == app_id)
                .order_by(versions_table.c.id.desc())
                .limit(1)
            ).scalar()
            if last != compose:
                conn.execute(versions_table.insert().values(app_id=app_id, at=now, compose=compose))
        found = self.get(user_id, name)
        assert found is not None
        return found

    def set_scale(self, app_id: str, scale: dict[str, int]) -> None:
        """Replicas per service over the file's (merged with what was set before)."""
        t = apps_table
        with self.engine.begin() as conn:
            before = json.loads(conn.execute(select(t.c.scale).where(t.c.id == app_id)).scalar() or "{}")
            conn.execute(update(t).where(t.c.id == app_id).values(scale=json.dumps({**before, **scale})))

    def set_stopped(self, app_id: str, stopped: bool) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(apps_table).where(apps_table.c.id == app_id).values(stopped=stopped))

    def wanted(self, row: dict[str, Any]) -> dict[str, int]:
        """How many replicas of each service should run: none when the app is stopped, else the scale set
        over the file, else the file's ``deploy.replicas``."""
        app = self.parsed(row["compose"])
        scale = json.loads(row.get("scale") or "{}")
        return {n: 0 if row.get("stopped") else int(scale.get(n, s.replicas)) for n, s in app.services.items()}

    def versions(self, app_id: str) -> list[dict[str, Any]]:
        """Every compose file the app had, newest first."""
        v = versions_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(v.at, v.compose).where(v.app_id == app_id).order_by(v.id.desc()))
            return [dict(r._mapping) for r in rows]

    def add_event(self, app_id: str, text: str) -> None:
        e = events_table.c
        with self.engine.begin() as conn:
            conn.execute(events_table.insert().values(app_id=app_id, at=time.time(), text=text[:1000]))
            cut = conn.execute(
                select(e.id).where(e.app_id == app_id).order_by(e.id.desc()).offset(EVENTS_KEPT).limit(1)
            ).scalar()
            if cut is not None:
                conn.execute(delete(events_table).where(e.app_id == app_id, e.id <= cut))

    def events(self, app_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The latest first."""
        e = events_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(e.at, e.text).where(e.app_id == app_id).order_by(e.id.desc()).limit(limit))
            return [dict(r._mapping) for r in rows]

    def get(self, user_id: str, name: str) -> dict[str, Any] | None:
        t = apps_table
        with self.engine.connect() as conn:
            row = conn.execute(select(t).where(t.c.user_id == user_id, t.c.name == name)).first()
        return dict(row._mapping) if row is not None else None

    def list(self, user_id: str | None = None) -> list[dict[str, Any]]:
        t = apps_table
        query = select(t).order_by(t.c.user_id, t.c.name)
        if user_id is not None:
            query = query.where(t.c.user_id == user_id)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def delete(self, user_id: str, name: str) -> bool:
        t = apps_table
        with self.engine.begin() as conn:
            app_id = conn.execute(select(t.c.id).where(t.c.user_id == user_id, t.c.name == name)).scalar()
            if app_id is None:
                return False
            conn.execute(delete(t).where(t.c.id == app_id))
            conn.execute(delete(versions_table).where(versions_table.c.app_id == app_id))
            conn.execute(delete(events_table).where(events_table.c.app_id == app_id))
            return True

    def owners(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(select(apps_table.c.user_id).distinct()).scalars())
