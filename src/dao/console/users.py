"""The console's accounts and sessions. An account is a log-in (name, password, admin or not) on top of an
accelerator user (:mod:`dao.mirror.accounts`): the same user ID keys the user's hosts, their accelerator
address and their monthly usage, so one user is one identity everywhere.

Passwords are hashed with scrypt (memory-hard, in the standard library: 16 MiB and about 50 ms a hash), with
a salt of their own; a log-in with an unknown name spends the same work, so timing does not tell which
names exist. A session is a random cookie whose SHA-256 is stored with the session's CSRF token; every
state-changing request must carry that token (``docs/console.md``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import Boolean, Column, Float, Integer, MetaData, String, Table, delete, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from dao.errors import DaoError
from dao.mirror.accounts import Accounts, Issued, secret_hash

metadata = MetaData()

accounts_table = Table(
    "console_accounts",
    metadata,
    Column("user_id", String(63), primary_key=True),  # the accelerator user's ID
    Column("login", String(64), nullable=False, unique=True),
    Column("password_hash", String(200), nullable=False),
    Column("admin", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
    Column("address_issue", Integer, nullable=False, default=0),  # how many addresses the console issued
)

sessions_table = Table(
    "console_sessions",
    metadata,
    Column("token_hash", String(100), primary_key=True),
    Column("user_id", String(63), nullable=False, index=True),
    Column("csrf", String(64), nullable=False),
    Column("expires_at", Float, nullable=False),
)

tokens_table = Table(
    "console_api_tokens",
    metadata,
    Column("token_hash", String(100), primary_key=True),
    Column("user_id", String(63), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
)

API_TOKEN_PREFIX = "daoapi_"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SESSION_TTL = 14 * 24 * 3600.0
LOGIN = re.compile(r"[a-z0-9][a-z0-9._-]{1,62}")
PASSWORD_MIN, PASSWORD_MAX = 8, 1024


class AccountError(DaoError):
    """Bad sign-up input, a name taken: a message for the person at the form."""


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(key).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        want = base64.b64decode(key)
        got = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(want)
        )
    except ValueError:
        return False
    return scheme == "scrypt" and hmac.compare_digest(got, want)


_DUMMY = hash_password(secrets.token_urlsafe(16))  # what an unknown name's log-in is checked against


@dataclass(frozen=True, slots=True)
class Session:
    user_id: str
    login: str
    admin: bool
    csrf: str


class Users:
    def __init__(self, engine: Engine, accounts: Accounts) -> None:
        self.engine = engine
        self.accounts = accounts
        metadata.create_all(engine)

    def add(self, login: str, password: str, *, admin: bool | None = None) -> tuple[str, Issued | None]:
        """A new account. An accelerator user whose ID or name is ``login`` and who has no account yet gets
        this one (an operator added them with ``dao mirror users add``); otherwise a new accelerator user is
        made, whose secrets are in the answer, once. ``admin=None``: the first account is the admin."""
        if not LOGIN.fullmatch(login):
            raise AccountError("a user name is 2-63 characters of a-z, 0-9, '.', '_', '-', from a letter or digit")
        if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
            raise AccountError(f"a password is {PASSWORD_MIN} to {PASSWORD_MAX} characters")
        with self.engine.connect() as conn:
            taken = {r.user_id for r in conn.execute(select(accounts_table.c.user_id))}
            first = not taken
        existing = [u for u in self.accounts.users() if login in (u.id, u.name) and u.id not in taken]
        issued = None
        if len(existing) == 1:
            user_id = existing[0].id
        else:
            issued = self.accounts.add_user(login)
            user_id = issued.user.id
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    accounts_table.insert().values(
                        user_id=user_id,
                        login=login,
                        password_hash=hash_password(password),
                        admin=first if admin is None else admin,
                        created_at=time.time(),
                    )
                )
        except IntegrityError:
            if issued is not None:
                self.accounts.remove_user(user_id)
            raise AccountError(f"the name {login!r} is taken") from None
        return user_id, issued

    def check(self, login: str, password: str) -> str | None:
        """The user ID when the password is theirs."""
        with self.engine.connect() as conn:
            row = conn.execute(select(accounts_table).where(accounts_table.c.login == login)).first()
        ok = check_password(password, row.password_hash if row is not None else _DUMMY)
        return row.user_id if row is not None and ok else None

    def address_issue(self, user_id: str) -> int:
        with self.engine.connect() as conn:
            found = conn.execute(
                select(accounts_table.c.address_issue).where(accounts_table.c.user_id == user_id)
            ).scalar()
        return int(found or 0)

    def set_address_issue(self, user_id: str, issue: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(accounts_table).where(accounts_table.c.user_id == user_id).values(address_issue=issue))

    def logins(self, user_ids: set[str]) -> dict[str, str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(accounts_table.c.user_id, accounts_table.c.login).where(accounts_table.c.user_id.in_(user_ids))
            )
            return {r.user_id: r.login for r in rows}

    def admins(self, user_ids: set[str]) -> set[str]:
        """Which of these users are admins."""
        a = accounts_table.c
        with self.engine.connect() as conn:
            return set(conn.execute(select(a.user_id).where(a.user_id.in_(user_ids), a.admin.is_(True))).scalars())

    # -- sessions ------------------------------------------------------------------------------------------

    def open_session(self, user_id: str) -> str:
        cookie = secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(delete(sessions_table).where(sessions_table.c.expires_at < time.time()))
            conn.execute(
                sessions_table.insert().values(
                    token_hash=secret_hash(cookie),
                    user_id=user_id,
                    csrf=secrets.token_urlsafe(24),
                    expires_at=time.time() + SESSION_TTL,
                )
            )
        return cookie

    def session(self, cookie: str) -> Session | None:
        s, a = sessions_table, accounts_table
        with self.engine.connect() as conn:
            row = conn.execute(
                select(s.c.user_id, s.c.csrf, s.c.expires_at, a.c.login, a.c.admin)
                .join(a, a.c.user_id == s.c.user_id)
                .where(s.c.token_hash == secret_hash(cookie))
            ).first()
        if row is None or row.expires_at < time.time():
            return None
        return Session(row.user_id, row.login, bool(row.admin), row.csrf)

    def issue_api_token(self, user_id: str) -> str:
        """A token for scripts and CI (``dao app --token``): it acts as its user, until the account goes."""
        token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(
                tokens_table.insert().values(token_hash=secret_hash(token), user_id=user_id, created_at=time.time())
            )
        return token

    def by_api_token(self, token: str) -> Session | None:
        t, a = tokens_table, accounts_table
        with self.engine.connect() as conn:
            row = conn.execute(
                select(t.c.user_id, a.c.login, a.c.admin)
                .join(a, a.c.user_id == t.c.user_id)
                .where(t.c.token_hash == secret_hash(token))
            ).first()
        return None if row is None else Session(row.user_id, row.login, bool(row.admin), "")

    def user_of(self, login: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(accounts_table.c.user_id).where(accounts_table.c.login == login)).scalar()

    def close_session(self, cookie: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(sessions_table).where(sessions_table.c.token_hash == secret_hash(cookie)))
