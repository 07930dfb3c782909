"""What the console keeps: enrolment tokens, hosts (with the hash of each host's credential), and the
metrics samples its agents sent. SQLAlchemy on the same database as the accelerator's users
(:class:`dao.mirror.accounts.Accounts`), so a user is one identity everywhere. Synchronous: the server calls
it in threads.

Secrets (enrolment tokens, host credentials) are stored as SHA-256 hashes and found by hash; the hash is
then compared again in constant time. A token is used once and expires; a host credential works until the
host is revoked.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
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
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine

from dao.errors import DaoError
from dao.mirror.accounts import same_secret, secret_hash

metadata = MetaData()

tokens_table = Table(
    "console_enroll_tokens",
    metadata,
    Column("token_hash", String(100), primary_key=True),
    Column("user_id", String(64), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float),
)

hosts_table = Table(
    "console_hosts",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("user_id", String(64), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("credential_hash", String(100), nullable=False, unique=True),
    Column("facts", Text, nullable=False, default="{}"),
    Column("version", String(50), nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    Column("connected", Boolean, nullable=False, default=False),
    Column("ping_interval", Float, nullable=False, default=10.0),
    Column("last_seen", Float),
    Column("revoked_at", Float),
    Column("labels", Text, nullable=False, default="{}"),  # the user's key=value labels (placement, in part 2)
)

samples_table = Table(
    "console_samples",
    metadata,
    Column("host_id", String(32), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("at", Float, nullable=False, index=True),
    Column("data", Text, nullable=False),
)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL: readers (pages, the API) no longer wait for the writers (metrics, heartbeats), and the other way
    round; the setting stays with the file, so the accelerator's connections to it get it too. NORMAL sync
    is safe under WAL (a power cut may lose the last commits, never the file)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class EnrollError(DaoError):
    """An enrolment token that is unknown, used, or expired."""


@dataclass(frozen=True, slots=True)
class Host:
    id: str
    user_id: str
    name: str
    revoked: bool


class Store:
    def __init__(self, url: str) -> None:
        # A server database: as many pooled connections as the threads that use them (the default of 5 made
        # the console open and close a connection per request past the fifth, under load).
        pool = {} if url.startswith("sqlite") else {"pool_size": 10, "max_overflow": 10}
        self.engine: Engine = create_engine(url, future=True, **pool)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        columns = {c["name"] for c in inspect(self.engine).get_columns(hosts_table.name)}
        if "labels" not in columns:  # a database from before labels
            with self.engine.begin() as conn:
                conn.execute(text(f"ALTER TABLE {hosts_table.name} ADD COLUMN labels TEXT NOT NULL DEFAULT '{{}}'"))

    # -- enrolment -----------------------------------------------------------------------------------------

    def issue_token(self, user_id: str, ttl: float = 24 * 3600) -> str:
        token = "daoenroll_" + secrets.token_urlsafe(24)
        with self.engine.begin() as conn:
            conn.execute(
                tokens_table.insert().values(
                    token_hash=secret_hash(token), user_id=user_id, expires_at=time.time() + ttl
                )
            )
        return token

    def redeem(self, token: str, name: str) -> tuple[str, str, str]:
        """Swap a token for a new host: (host ID, credential, user ID). The credential exists only in this
        answer."""
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(select(tokens_table).where(tokens_table.c.token_hash == secret_hash(token))).first()
            if row is None or not same_secret(token, row.token_hash):
                raise EnrollError("unknown enrolment token")
            if row.used_at is not None:
                raise EnrollError("this enrolment token was used already; ask the console for a new one")
            if row.expires_at < now:
                raise EnrollError("this enrolment token expired; ask the console for a new one")
            done = conn.execute(
                update(tokens_table)
                .where(tokens_table.c.token_hash == row.token_hash, tokens_table.c.used_at.is_(None))
                .values(used_at=now)
            )
            if done.rowcount != 1:
                raise EnrollError("this enrolment token was used already; ask the console for a new one")
            host_id, credential = secrets.token_hex(8), "daohost_" + secrets.token_urlsafe(32)
            conn.execute(
                hosts_table.insert().values(
                    id=host_id,
                    user_id=row.user_id,
                    name=name[:200] or host_id,
                    credential_hash=secret_hash(credential),
                    created_at=now,
                )
            )
        return host_id, credential, row.user_id

    def host_by_credential(self, credential: str) -> Host | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(hosts_table).where(hosts_table.c.credential_hash == secret_hash(credential))
            ).first()
        if row is None or not same_secret(credential, row.credential_hash):
            return None
        return Host(row.id, row.user_id, row.name, row.revoked_at is not None)

    def revoke(self, host_id: str) -> bool:
        with self.engine.begin() as conn:
            done = conn.execute(
                update(hosts_table).where(hosts_table.c.id == host_id).values(revoked_at=time.time(), connected=False)
            )
        return done.rowcount == 1

    # -- the channel ---------------------------------------------------------------------------------------

    def connected(self, host_id: str, facts: dict[str, Any], version: str, ping_interval: float) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(hosts_table)
                .where(hosts_table.c.id == host_id)
                .values(
                    connected=True,
                    facts=json.dumps(facts),
                    version=version[:50],
                    ping_interval=ping_interval,
                    last_seen=time.time(),
                )
            )

    def seen_many(self, heard: dict[str, float]) -> None:
        """``last_seen`` of many hosts in one statement (executemany)."""
        t = hosts_table
        with self.engine.begin() as conn:
            conn.execute(
                update(t).where(t.c.id == bindparam("host")).values(last_seen=bindparam("at")),
                [{"host": h, "at": at} for h, at in heard.items()],
            )

    def revoked_among(self, host_ids: set[str]) -> set[str]:
        t = hosts_table
        with self.engine.connect() as conn:
            rows = conn.execute(select(t.c.id).where(t.c.id.in_(host_ids), t.c.revoked_at.is_not(None)))
            return {r.id for r in rows}

    def disconnected(self, host_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(hosts_table).where(hosts_table.c.id == host_id).values(connected=False))

    def add_sample_batches(self, batches: list[tuple[str, int, list[dict[str, Any]]]]) -> None:
        """Store metrics frames of many hosts in one transaction; each is ``(host, seq of its last sample,
        samples)``. A sample already stored (a frame sent again after a reconnect) is left as it is, so every
        sample is stored once."""
        rows = [
            {
                "host_id": host,
                "seq": last - len(samples) + 1 + i,
                "at": float(s.get("at") or 0.0),
                "data": json.dumps(s),
            }
            for host, last, samples in batches
            for i, s in enumerate(samples)
        ]
        if not rows:
            return
        dialect = self.engine.dialect.name
        if dialect in ("sqlite", "postgresql"):
            insert = sqlite_insert if dialect == "sqlite" else postgresql_insert
            with self.engine.begin() as conn:
                conn.execute(insert(samples_table).on_conflict_do_nothing(), rows)
            return
        with self.engine.begin() as conn:  # another database: look first
            keys = {(r["host_id"], r["seq"]) for r in rows}
            c = samples_table.c
            have = set()
            for host in {r["host_id"] for r in rows}:
                seqs = [seq for h, seq in keys if h == host]
                have |= {
                    (host, seq)
                    for seq in conn.execute(
                        select(c.seq).where(c.host_id == host, c.seq.between(min(seqs), max(seqs)))
                    ).scalars()
                }
            rows = [r for r in rows if (r["host_id"], r["seq"]) not in have]
            if rows:
                conn.execute(samples_table.insert(), rows)

    # -- reading -------------------------------------------------------------------------------------------

    def hosts(self, user_id: str | None = None, host_id: str | None = None) -> list[dict[str, Any]]:
        """Every host (or a user's, or the one), with ``online`` (channel open and heard from within 3 ping
        intervals) and its latest metrics sample."""
        now = time.time()
        query = select(hosts_table).order_by(hosts_table.c.created_at)
        if user_id is not None:
            query = query.where(hosts_table.c.user_id == user_id)
        if host_id is not None:
            query = query.where(hosts_table.c.id == host_id)
        out = []
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                latest = conn.execute(
                    select(samples_table.c.data)
                    .where(samples_table.c.host_id == row.id)
                    .order_by(samples_table.c.seq.desc())
                    .limit(1)
                ).scalar()
                fresh = row.last_seen is not None and now - row.last_seen < 3 * row.ping_interval
                out.append(
                    {
                        "id": row.id,
                        "name": row.name,
                        "user": row.user_id,
                        "online": bool(row.connected and fresh and row.revoked_at is None),
                        "last_seen": row.last_seen,
                        "revoked": row.revoked_at is not None,
                        "version": row.version,
                        "facts": json.loads(row.facts or "{}"),
                        "labels": json.loads(row.labels or "{}"),
                        "metrics": json.loads(latest) if latest else None,
                    }
                )
        return out

    def samples(self, host_id: str, since: float = 0.0, points: int | None = None) -> list[dict[str, Any]]:
        """The samples since ``since``, oldest first; with ``points``, at most about that many (every n-th:
        a day's 8,640 samples drawn as a chart need not all cross the wire)."""
        c = samples_table.c
        with self.engine.connect() as conn:
            where = (c.host_id == host_id, c.at >= since)
            step = 1
            if points:
                count = conn.execute(select(func.count()).select_from(samples_table).where(*where)).scalar() or 0
                step = max(1, -(-count // points))
            rows = conn.execute(select(c.data).where(*where).order_by(c.seq)).scalars()
            return [json.loads(r) for i, r in enumerate(rows) if i % step == 0]

    def set_labels(self, host_id: str, labels: dict[str, str]) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(hosts_table).where(hosts_table.c.id == host_id).values(labels=json.dumps(labels)))

    def close(self) -> None:
        self.engine.dispose()
