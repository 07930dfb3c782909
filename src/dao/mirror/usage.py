"""Who is pulling, whether their monthly allowance lets them, and what they got.

A request is identified by the host it was sent to (``<address>.<mirror-domain>``, where the address label is
a secret of the user's), else by a token (``Authorization: Bearer <token>``, or Basic with the user ID and the
token), else it is anonymous -- allowed or answered with a Basic challenge, as configured. The user's ID (a
short public handle) identifies nobody: a Host header naming it is anonymous.

Counting stays off the hot path: :meth:`Meter.record` adds to an in-memory table; every ``flush_interval``
seconds one transaction adds those deltas to the database (from a thread), and the month's totals and the
user list are read back (so a quota raised with the CLI, or usage counted by another mirror node on the same
database, is seen within one interval). A clean shutdown flushes. A failed write keeps the deltas for the next
try. Quotas compare the month's totals plus what is not yet written plus what is being sent right now (each blob
response reserves its size when it starts): a blob that starts under the quota is served whole, so a user can
end a month up to one blob over, however many requests they send at once. Bytes are counted as sent: a client
that hangs up is charged for what went out.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError

from dao.config import MirrorConfig
from dao.mirror.accounts import ANONYMOUS, Accounts, Usage, User, same_secret, secret_hash
from dao.mirror.errors import NotAuthenticated, QuotaUsed
from dao.units import format_size

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (user ID, YYYY-MM)

SYNC_INTERVAL = 1.0  # seconds between a cluster node's additions to (and reads of) the shared counters


class LiveUsage(Protocol):
    """A cluster's running totals per user per month, every node's bytes added as they are counted (Redis:
    :meth:`dao.mirror.cluster.Cluster.add_usage`)."""

    def add_usage(self, month: str, deltas: dict[str, int]) -> Awaitable[dict[str, int] | None]:
        """Add ``deltas``; every user's total after that, or None when the counters do not answer."""
        ...


def month_of(t: float) -> str:
    tm = time.gmtime(t)
    return f"{tm.tm_year:04d}-{tm.tm_mon:02d}"


def next_month(month: str) -> str:
    year, mon = int(month[:4]), int(month[5:])
    return f"{year + mon // 12:04d}-{mon % 12 + 1:02d}"


class Meter:
    def __init__(
        self,
        accounts: Accounts,
        *,
        domain: str = "",
        anonymous: bool = MirrorConfig.anonymous,
        default_quota: int = 0,
        flush_interval: float = MirrorConfig.usage_flush,
        clock: Callable[[], float] = time.time,
        live: LiveUsage | None = None,
        sync_interval: float = SYNC_INTERVAL,
    ) -> None:
        """``live``: a cluster's shared running totals. Each node adds its bytes there every ``sync_interval``
        and reads back everyone's, so a quota holds for the sum over the nodes within about a second, not
        only after every node's next SQL write and read."""
        self.accounts = accounts
        self.live = live
        self.sync_interval = sync_interval
        self._live_ok = False  # the shared totals answered at the last sync
        self._unsynced: dict[Key, int] = {}  # bytes counted here, not yet added to the shared totals
        self._shared: dict[Key, int] = {}  # the shared totals of this month, as the last sync read them
        self.domain = domain.lower().strip(".")
        self.anonymous = anonymous
        self.default_quota = default_quota  # bytes a month; 0 = no limit
        self.flush_interval = flush_interval
        self.clock = clock
        self._users: dict[str, User] = {}
        self._by_token: dict[str, User] = {}  # by the token's hash
        self._by_address: dict[str, User] = {}  # by the address label's hash
        self._totals: dict[Key, Usage] = {}  # this month, as the database last said
        self._pending: dict[Key, Usage] = {}  # counted, not yet written
        self._flushing: dict[Key, Usage] = {}  # being written right now
        self._reserved: dict[str, int] = {}  # user -> bytes of responses being sent now, not yet recorded

    # -- request path --------------------------------------------------------------------------------------

    def identify(self, host: str | None, authorization: str | None) -> str:
        """The user ID for a request, or :data:`ANONYMOUS`; raises UNAUTHORIZED when anonymity is off."""
        if host and self.domain:
            name = host.lower().rsplit(":", 1)[0] if not host.startswith("[") else ""
            label, _, rest = name.partition(".")
            if rest == self.domain and label:
                user = self._by_address.get(secret_hash(label))
                if user is not None and same_secret(label, user.address):
                    return user.id
        if authorization:
            scheme, _, value = authorization.partition(" ")
            user = self._from_credentials(scheme.lower(), value.strip())
            if user is not None:
                return user.id
        if self.anonymous:
            return ANONYMOUS
        raise NotAuthenticated(
            "this mirror serves its users only: use your address <id>."
            + (self.domain or "<mirror domain>")
            + " or log in with your user ID and token"
        )

    def _from_credentials(self, scheme: str, value: str) -> User | None:
        if scheme == "bearer":
            user = self._by_token.get(secret_hash(value))
            return user if user is not None and same_secret(value, user.token) else None
        if scheme == "basic":
            try:
                user_id, _, token = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            user = self._users.get(user_id)
            if user is not None and same_secret(token, user.token):
                return user
        return None

    def name_of(self, user_id: str) -> str:
        """What the logs call a user: their name, never a secret (the address label is one)."""
        user = self._users.get(user_id)
        return user.name if user is not None else user_id

    def quota_of(self, user_id: str) -> int:
        user = self._users.get(user_id)
        return user.quota_bytes if user is not None and user.quota_bytes is not None else self.default_quota

    def used(self, user_id: str, month: str) -> int:
        """The month's bytes: SQL's totals and what this node has not written yet; in a cluster, the shared
        running total (every node's bytes) when that is more (it is, unless Redis lost its data)."""
        key = (user_id, month)
        known = sum(table[key].bytes_served for table in (self._totals, self._flushing, self._pending) if key in table)
        if self.live is None or not self._live_ok:
            return known
        return max(known, self._shared.get(key, 0) + self._unsynced.get(key, 0))

    def check(self, user_id: str) -> None:
        """Raises TOOMANYREQUESTS once the user's bytes this month, with those of their responses being sent
        right now, reached their quota."""
        quota = self.quota_of(user_id)
        if quota <= 0:
            return
        month = month_of(self.clock())
        used = self.used(user_id, month) + self._reserved.get(user_id, 0)
        if used >= quota:
            raise QuotaUsed(
                f"monthly quota of {format_size(quota)} for {user_id} is used up: {format_size(used)} served in "
                f"{month}; it resets at {next_month(month)}-01T00:00:00Z",
            )

    def reserve(self, user_id: str, nbytes: int) -> None:
        """Hold ``nbytes`` of the user's quota for a response about to be sent: N parallel requests cannot all
        pass one check. Raises TOOMANYREQUESTS as :meth:`check` does; :meth:`release` gives it back."""
        self.check(user_id)
        self._reserved[user_id] = self._reserved.get(user_id, 0) + nbytes

    def release(self, user_id: str, nbytes: int) -> None:
        left = self._reserved.get(user_id, 0) - nbytes
        if left > 0:
            self._reserved[user_id] = left
        else:
            self._reserved.pop(user_id, None)

    def record(self, user_id: str, *, sent: int, blob: bool = False, pull: bool = False, hit: bool = False) -> None:
        key = (user_id, month_of(self.clock()))
        usage = self._pending.get(key)
        if usage is None:
            usage = self._pending[key] = Usage()
        usage.bytes_served += sent
        if self.live is not None and sent:
            self._unsynced[key] = self._unsynced.get(key, 0) + sent
        usage.blobs_served += int(blob)
        usage.pulls += int(pull)
        if hit:
            usage.hit_bytes += sent

    # -- background ----------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Flush and reload every interval until cancelled; then flush once more (a clean stop loses nothing).
        In a cluster, sync with the shared totals every ``sync_interval`` too."""
        await self.refresh()
        try:
            next_flush = time.monotonic() + self.flush_interval
            while True:
                wait = next_flush - time.monotonic()
                if self.live is not None:
                    wait = min(wait, self.sync_interval)
                await asyncio.sleep(max(0.0, wait))
                if time.monotonic() >= next_flush:
                    await self.refresh()
                    next_flush = time.monotonic() + self.flush_interval
                await self.sync()
        finally:
            await asyncio.shield(self.flush())
            await asyncio.shield(self.sync())

    async def sync(self) -> None:
        """Add this node's new bytes to the shared totals and read everyone's back. Bytes counted while they
        do not answer are added when they do again (SQL has them meanwhile, through the flush)."""
        if self.live is None:
            return
        month = month_of(self.clock())
        by_month: dict[str, dict[str, int]] = {month: {}}
        for (user, m), n in self._unsynced.items():
            by_month.setdefault(m, {})[user] = n
        ok = True
        for m, deltas in by_month.items():
            seen = await self.live.add_usage(m, deltas)
            if seen is None:
                ok = False
                break
            for user, n in deltas.items():  # (what was counted meanwhile stays for the next sync)
                left = self._unsynced.pop((user, m), 0) - n
                if left:
                    self._unsynced[(user, m)] = left
            if m == month:
                self._shared = {(user, m): n for user, n in seen.items()}
        self._live_ok = ok

    async def refresh(self) -> None:
        await self.flush()
        try:
            users, totals = await asyncio.to_thread(self._read, month_of(self.clock()))
        except SQLAlchemyError as exc:
            log.warning("cannot read users and usage, keeping the last known: %s", exc)
            return
        self._users = {u.id: u for u in users}
        self._by_token = {u.token: u for u in users}
        self._by_address = {u.address: u for u in users if u.address is not None}
        self._totals = totals

    def _read(self, month: str) -> tuple[list[User], dict[Key, Usage]]:
        return self.accounts.users(), {(u, m): usage for u, m, usage in self.accounts.usage(month=month)}

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        self._flushing = batch
        try:
            await asyncio.to_thread(self.accounts.add_usage, [(u, m, d) for (u, m), d in batch.items()])
        except SQLAlchemyError as exc:
            log.warning("cannot write usage, keeping it for the next try: %s", exc)
            for key, delta in batch.items():
                self._pending.setdefault(key, Usage()).add(delta)
            return
        finally:
            self._flushing = {}
        for key, delta in batch.items():  # until the next read, count what was just written as known
            self._totals.setdefault(key, Usage()).add(delta)
