"""Users of the mirror and their monthly usage, in SQL: SQLite by default, PostgreSQL by URL.

The schema is two tables. ``users``: the user's ID (a short public handle: the key of their usage, named in
the CLI), a name, the SHA-256 of their secret token (for clients that can send credentials) and of their
secret address label (the ``<address>`` of ``<address>.<mirror-domain>``, for docker's ``registry-mirrors``,
which cannot), and an optional monthly byte quota. ``usage``: one row per user per UTC calendar month
(``YYYY-MM``) -- a new month starts a new row, so history stays.

Tokens and addresses are random (192 and 120 bits), shown once when issued and stored only as hashes: a
copy of the database lets nobody pull as a user. A plain SHA-256 is enough for secrets that random (nothing
to brute-force); lookups go by hash, and comparisons use :func:`hmac.compare_digest`. Rows written before
tokens were hashed are hashed in place when the database is opened; those users have no address until one is
issued (``dao mirror users reissue ID --address``), since their old address was their guessable ID.

Everything here is blocking (SQLAlchemy Core); the server calls it from a thread, a few times a minute, never
per request (see :mod:`dao.mirror.usage`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from dao.errors import DaoError

metadata = MetaData()

users_table = Table(
    "dao_users",
    metadata,
    Column("id", String(63), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("token", String(100), nullable=False, unique=True),  # "sha256:<hex>" of the token
    Column("quota_bytes", BigInteger, nullable=True),  # None: the mirror's default
    Column("created_at", Float, nullable=False),
    Column("address", String(100), nullable=True, unique=True),  # "sha256:<hex>" of the address label
)

usage_table = Table(
    "dao_usage",
    metadata,
    Column("user_id", String(63), primary_key=True),
    Column("month", String(7), primary_key=True),
    Column("bytes_served", BigInteger, nullable=False, default=0),
    Column("blobs_served", BigInteger, nullable=False, default=0),
    Column("pulls", BigInteger, nullable=False, default=0),
    Column("hit_bytes", BigInteger, nullable=False, default=0),
)

ANONYMOUS = "anonymous"
_ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # one DNS label: it becomes a host name


class AccountError(DaoError, ValueError):
    """A bad request to the account store (unknown user, duplicate ID, bad size); the message says which."""


HASHED = "sha256:"


def secret_hash(secret: str) -> str:
    return HASHED + hashlib.sha256(secret.encode()).hexdigest()


def same_secret(secret: str, stored: str | None) -> bool:
    return stored is not None and hmac.compare_digest(secret_hash(secret).encode(), stored.encode())


def new_token() -> str:
    return "dao_" + secrets.token_urlsafe(24)


def new_address() -> str:
    """A DNS label of 24 base32 characters: 120 random bits, not to be guessed from the access log or a scan."""
    return base64.b32encode(secrets.token_bytes(15)).decode().lower()


@dataclass(frozen=True, slots=True)
class User:
    id: str
    name: str
    token: str  # hash
    quota_bytes: int | None
    created_at: float
    address: str | None  # hash; None until an address is issued


@dataclass(frozen=True, slots=True)
class Issued:
    """Secrets as they were just issued: the only time they exist outside the user's hands."""

    user: User
    token: str | None = None
    address: str | None = None


@dataclass(slots=True)
class Usage:
    bytes_served: int = 0
    blobs_served: int = 0
    pulls: int = 0
    hit_bytes: int = 0

    def add(self, other: Usage) -> None:
        self.bytes_served += other.bytes_served
        self.blobs_served += other.blobs_served
        self.pulls += other.pulls
        self.hit_bytes += other.hit_bytes


class Accounts:
    def __init__(self, url: str) -> None:
        try:
            _private_sqlite_file(url)
            self.engine: Engine = create_engine(url, future=True)
            metadata.create_all(self.engine)
            self._migrate()
        except OSError as exc:
            raise AccountError(f"cannot create the accounts database: {exc}") from exc
        except ImportError as exc:
            raise AccountError(
                f"no driver for {url.split(':', 1)[0]}: {exc.name or exc} (for PostgreSQL: pip install 'dao[postgres]')"
            ) from exc
        except SQLAlchemyError as exc:
            shown = make_url(url).render_as_string(hide_password=True)
            raise AccountError(f"cannot open the accounts database {shown}: {exc.__class__.__name__}: {exc}") from exc

    def _migrate(self) -> None:
        """Bring a database written by an older dao up to this schema: the address column, hashed tokens."""
        columns = {c["name"] for c in inspect(self.engine).get_columns(users_table.name)}
        with self.engine.begin() as conn:
            if "address" not in columns:
                conn.execute(text(f"ALTER TABLE {users_table.name} ADD COLUMN address VARCHAR(100)"))
            t = users_table
            for row in conn.execute(select(t.c.id, t.c.token).where(~t.c.token.startswith(HASHED))).all():
                conn.execute(update(t).where(t.c.id == row.id).values(token=secret_hash(row.token)))

    # -- users ---------------------------------------------------------------------------------------------

    def add_user(self, name: str, *, user_id: str | None = None, quota_bytes: int | None = None) -> Issued:
        user_id = user_id or secrets.token_hex(4)
        if not _ID.fullmatch(user_id) or user_id == ANONYMOUS:
            raise AccountError(f"user ID must be a DNS label (a-z, 0-9, '-', up to 63) and not {ANONYMOUS!r}")
        token, address = new_token(), new_address()
        user = User(user_id, name, secret_hash(token), quota_bytes, time.time(), secret_hash(address))
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(users_table).values(**asdict(user)))
        except IntegrityError as exc:
            raise AccountError(f"a user with ID {user_id!r} already exists") from exc
        return Issued(user, token, address)

    def reissue(self, user_id: str, *, token: bool = False, address: bool = False) -> Issued:
        """New secrets for the user; the old ones stop working at once here (a running mirror: within its
        flush interval)."""
        values: dict[str, str] = {}
        new = Issued(self.user(user_id), new_token() if token else None, new_address() if address else None)
        if new.token is not None:
            values["token"] = secret_hash(new.token)
        if new.address is not None:
            values["address"] = secret_hash(new.address)
        if values:
            with self.engine.begin() as conn:
                conn.execute(update(users_table).where(users_table.c.id == user_id).values(**values))
        return new

    def set_address(self, user_id: str, address: str) -> None:
        """Give the user this address (a label :func:`new_address` would make, chosen elsewhere: the console
        derives it from its secret, so it can show it again without storing it). Only its hash is kept."""
        if not re.fullmatch(r"[a-z2-7]{24}", address):
            raise AccountError("an address is 24 characters of a-z and 2-7")
        with self.engine.begin() as conn:
            done = conn.execute(
                update(users_table).where(users_table.c.id == user_id).values(address=secret_hash(address))
            )
        if done.rowcount == 0:
            raise AccountError(f"no user {user_id!r} (see 'dao mirror users list')")

    def users(self) -> list[User]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(users_table).order_by(users_table.c.id)).all()
        return [_user(r) for r in rows]

    def user(self, user_id: str) -> User:
        with self.engine.connect() as conn:
            r = conn.execute(select(users_table).where(users_table.c.id == user_id)).first()
        if r is None:
            raise AccountError(f"no user {user_id!r} (see 'dao mirror users list')")
        return _user(r)

    def set_quota(self, user_id: str, quota_bytes: int | None) -> None:
        with self.engine.begin() as conn:
            done = conn.execute(update(users_table).where(users_table.c.id == user_id).values(quota_bytes=quota_bytes))
        if done.rowcount == 0:
            raise AccountError(f"no user {user_id!r} (see 'dao mirror users list')")

    def remove_user(self, user_id: str) -> None:
        """The user goes; their usage history stays (it is what was served)."""
        with self.engine.begin() as conn:
            done = conn.execute(delete(users_table).where(users_table.c.id == user_id))
        if done.rowcount == 0:
            raise AccountError(f"no user {user_id!r} (see 'dao mirror users list')")

    # -- usage ---------------------------------------------------------------------------------------------

    def add_usage(self, deltas: Iterable[tuple[str, str, Usage]]) -> None:
        """Add ``(user, month, delta)`` counts in one transaction (insert the row the first time)."""
        t = usage_table
        with self.engine.begin() as conn:
            for user_id, month, d in deltas:
                done = conn.execute(
                    update(t)
                    .where(t.c.user_id == user_id, t.c.month == month)
                    .values(
                        bytes_served=t.c.bytes_served + d.bytes_served,
                        blobs_served=t.c.blobs_served + d.blobs_served,
                        pulls=t.c.pulls + d.pulls,
                        hit_bytes=t.c.hit_bytes + d.hit_bytes,
                    )
                )
                if done.rowcount == 0:
                    conn.execute(insert(t).values(user_id=user_id, month=month, **asdict(d)))

    def usage(self, *, user_id: str | None = None, month: str | None = None) -> list[tuple[str, str, Usage]]:
        t = usage_table
        query = select(t).order_by(t.c.month.desc(), t.c.user_id)
        if user_id is not None:
            query = query.where(t.c.user_id == user_id)
        if month is not None:
            query = query.where(t.c.month == month)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [(r.user_id, r.month, Usage(r.bytes_served, r.blobs_served, r.pulls, r.hit_bytes)) for r in rows]

    def close(self) -> None:
        self.engine.dispose()


def _user(r: Any) -> User:
    return User(r.id, r.name, r.token, r.quota_bytes, r.created_at, r.address)


def _private_sqlite_file(url: str) -> None:
    """A new SQLite file is created readable by its owner only: it holds who may pull, and what they pulled."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or not parsed.database or parsed.database == ":memory:":
        return
    path = parsed.database
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    os.chmod(path, 0o600)
