"""The user's accelerator in the console: their address, this month's usage and quota, past months, and
requests for more quota that an admin approves or declines (``docs/console.md``).

The address (the secret ``<label>`` of ``<label>.<mirror domain>``) is derived, not stored: an HMAC of the
user's ID and an issue count under the console's secret. The accelerator keeps only its hash, as for every
address; the console can show it again whenever the user asks, and a re-issue (the count goes up) makes a new
one and ends the old. An approved request sets the user's quota in the accelerator's users table, which a
running mirror re-reads every ``--usage-flush`` seconds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import BigInteger, Column, Float, MetaData, String, Table, Text, select, update

from dao.console.users import Users
from dao.errors import DaoError
from dao.paths import write_private

metadata = MetaData()

requests_table = Table(
    "console_quota_requests",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("user_id", String(63), nullable=False, index=True),
    Column("quota_bytes", BigInteger, nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("status", String(16), nullable=False, default="pending"),  # pending, approved, declined
    Column("created_at", Float, nullable=False),
    Column("decided_at", Float),
    Column("decided_by", String(63)),
)

REASON_MAX = 500
QUOTA_MAX = 1 << 60


class QuotaError(DaoError):
    pass


def load_secret(path: Path) -> bytes:
    """The console's secret (32 random bytes, made on first use, mode 600). Console nodes that serve the
    same users share it (``--secret-file``)."""
    try:
        data = bytes.fromhex(path.read_text().strip())
        if len(data) >= 32:
            return data
    except FileNotFoundError:
        pass
    except ValueError:
        raise DaoError(f"{path} is not a console secret (64 hex characters)") from None
    fresh = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, fresh.hex() + "\n")
    return fresh


def derive_address(secret: bytes, user_id: str, issue: int) -> str:
    digest = hmac.new(secret, f"dao-accelerator-address\0{user_id}\0{issue}".encode(), hashlib.sha256).digest()
    return base64.b32encode(digest[:15]).decode().lower()  # 24 characters, 120 bits: as new_address()


def address_url(base: str, address: str) -> str:
    """``http://mirror.example:5000`` and a label -> ``http://<label>.mirror.example:5000``."""
    split = urlsplit(base)
    return f"{split.scheme}://{address}.{split.netloc}"


@dataclass(frozen=True, slots=True)
class Settings:
    base_url: str  # the accelerator's URL, its host the mirror domain; "" when the console was not told
    default_quota: int  # bytes a month for users with no quota of their own; 0: none


class Accelerator:
    def __init__(self, users: Users, secret: bytes, settings: Settings) -> None:
        self.users = users
        self.engine = users.engine
        self.accounts = users.accounts
        self.secret = secret
        self.settings = settings
        metadata.create_all(self.engine)

    # -- the address ---------------------------------------------------------------------------------------

    def address(self, user_id: str) -> str | None:
        """The user's address label, None until the console has issued one."""
        issue = self.users.address_issue(user_id)
        return derive_address(self.secret, user_id, issue) if issue > 0 else None

    def issue(self, user_id: str) -> str:
        """A new address label (the old one stops working within the mirror's flush interval)."""
        issue = self.users.address_issue(user_id) + 1
        address = derive_address(self.secret, user_id, issue)
        self.accounts.set_address(user_id, address)
        self.users.set_address_issue(user_id, issue)
        return address

    def url(self, address: str | None) -> str | None:
        return address_url(self.settings.base_url, address) if address and self.settings.base_url else None

    def mirror(self, user_id: str) -> str | None:
        """The user's accelerator URL (``http://<label>.<domain>``), when there is one to give."""
        return self.url(self.address(user_id))

    # -- usage ---------------------------------------------------------------------------------------------

    def view(self, user_id: str) -> dict[str, Any]:
        user = self.accounts.user(user_id)
        month = time.strftime("%Y-%m", time.gmtime())
        months = [
            {"month": m, "bytes": u.bytes_served, "pulls": u.pulls, "hit_bytes": u.hit_bytes}
            for _, m, u in self.accounts.usage(user_id=user_id)
        ]
        quota = user.quota_bytes if user.quota_bytes is not None else self.settings.default_quota
        url = self.mirror(user_id)
        return {
            "configured": bool(self.settings.base_url),
            "address": url,
            "command": f"sudo dao mirror use {url}" if url else None,
            "month": month,
            "used": next((m["bytes"] for m in months if m["month"] == month), 0),
            "quota": quota or None,  # None: no limit
            "months": sorted(months, key=lambda m: m["month"])[-12:],
            "requests": self.requests(user_id),
        }

    # -- quota requests ------------------------------------------------------------------------------------

    def request(self, user_id: str, quota_bytes: int, reason: str) -> dict[str, Any]:
        if not 0 < quota_bytes <= QUOTA_MAX:
            raise QuotaError("ask for a monthly quota above zero, e.g. 100GiB")
        if len(reason) > REASON_MAX:
            raise QuotaError(f"a reason is at most {REASON_MAX} characters")
        with self.engine.begin() as conn:
            pending = conn.execute(
                select(requests_table.c.id).where(
                    requests_table.c.user_id == user_id, requests_table.c.status == "pending"
                )
            ).first()
            if pending is not None:
                raise QuotaError("you have a request waiting already; an admin will answer it")
            row = {
                "id": secrets.token_hex(8),
                "user_id": user_id,
                "quota_bytes": quota_bytes,
                "reason": reason,
                "status": "pending",
                "created_at": time.time(),
            }
            conn.execute(requests_table.insert().values(**row))
        return row

    def requests(self, user_id: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        query = select(requests_table).order_by(requests_table.c.created_at.desc()).limit(100)
        if user_id is not None:
            query = query.where(requests_table.c.user_id == user_id)
        if status is not None:
            query = query.where(requests_table.c.status == status)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def decide(self, request_id: str, approve: bool, admin_id: str) -> dict[str, Any]:
        """Approve (the user's quota becomes the one asked for) or decline a pending request, once."""
        t = requests_table
        with self.engine.begin() as conn:
            row = conn.execute(select(t).where(t.c.id == request_id)).first()
            if row is None:
                raise QuotaError("no such request")
            if row.status != "pending":
                raise QuotaError(f"this request was {row.status} already")
            status = "approved" if approve else "declined"
            conn.execute(
                update(t)
                .where(t.c.id == request_id, t.c.status == "pending")
                .values(status=status, decided_at=time.time(), decided_by=admin_id)
            )
        if approve:
            self.accounts.set_quota(row.user_id, row.quota_bytes)
        return {**dict(row._mapping), "status": status}
