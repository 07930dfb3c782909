"""The apps: each a compose file (kept as the user wrote it) under a name of its owner's. Its ID, not its
name, labels its containers (``dao.app``), so two users' apps of one name never meet on a host."""

from __future__ import annotations

import secrets
import time
from typing import Any

from sqlalchemy import Column, Float, MetaData, String, Table, Text, UniqueConstraint, delete, select, update
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
    UniqueConstraint("user_id", "name"),
)


class Apps:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        metadata.create_all(engine)
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
            done = conn.execute(
                update(t).where(t.c.user_id == user_id, t.c.name == name).values(compose=compose, updated_at=now)
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
        found = self.get(user_id, name)
        assert found is not None
        return found

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
            return conn.execute(delete(t).where(t.c.user_id == user_id, t.c.name == name)).rowcount == 1

    def owners(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(select(apps_table.c.user_id).distinct()).scalars())
