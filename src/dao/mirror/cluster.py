"""Mirror nodes working as one (``--redis URL``): what they must agree on, in Redis.

- **One upstream transfer per blob across the nodes.** The node that starts a blob's fetch takes a *lease*
  (``lease:<digest>`` = ``<fencing token> <node URL>``, set only if absent, renewed every third of its TTL
  while the fetch runs, removed when it ends). The fencing token comes from one counter, so every lease ever
  granted has its own: a renewal or removal compares it, and a node that lost its lease (paused past the TTL)
  can never extend or drop its successor's. A node that misses while another holds the lease reads the
  bytes from that node's internal endpoint (``/_dao/blobs/<digest>``, signed with the cluster secret), from
  its spool file as they arrive, not after the commit (:class:`NodeSource`). If that node dies, its lease
  expires within the TTL; the reader takes the lease and goes on from the upstream from the byte it had.
- **Usage**: running totals per user per month, one hash a month that every node adds its bytes to each
  second and reads back (see :mod:`dao.mirror.usage`); each node still writes its own bytes to SQL.
- **Negative cache and tag re-validation**: an upstream 404 is remembered for every node; of the nodes that
  find a tag due for re-validation at once, one asks the upstream (:meth:`Cluster.first`).

Redis is asked with a short timeout. When it does not answer, each node goes on alone (local single-flight,
its own counters and negative cache), says so in ``/readyz`` and the log, and asks Redis again every few
seconds; nothing a client asked for fails because Redis is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from dao.errors import DaoError
from dao.mirror.signing import Signer
from dao.oci.digest import Digest

log = logging.getLogger("dao.mirror.cluster")

LEASE_TTL = 10.0  # seconds a dead node's lease outlives it: how long its readers wait before taking over
REDIS_TIMEOUT = 1.0  # seconds for one Redis call; past it the node goes on alone for this request
DOWN_RETRY = 3.0  # seconds a node that found Redis down goes on alone before it asks again
POOL = 64  # Redis connections of one node
USAGE_DAYS = 40  # a month's counters expire this long after their last change

T = TypeVar("T")

_CLAIM = """
local held = redis.call('GET', KEYS[1])
if held then return {held, 0} end
local value = redis.call('INCR', KEYS[2]) .. ' ' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {value, 1}
"""
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_DROP = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class ClusterError(DaoError):
    pass


@dataclass(frozen=True, slots=True)
class Claim:
    """Who fetches a blob: ``mine`` (this node, with the lease, or alone while Redis is down) or the node at
    ``owner``."""

    owner: str
    token: int
    mine: bool


@dataclass(slots=True)
class _Held:
    value: str
    renewer: asyncio.Task[None]


class Cluster:
    def __init__(
        self,
        url: str,
        node_url: str,
        secret: str,
        *,
        lease_ttl: float = LEASE_TTL,
        prefix: str = "dao:mirror:",
    ) -> None:
        if not secret:
            raise ClusterError("a cluster needs a secret (cluster_secret, DAO_CLUSTER_SECRET) the nodes share")
        self.url, self.node_url, self.lease_ttl, self.prefix = url, node_url.rstrip("/"), lease_ttl, prefix
        self._signer = Signer(secret, "blob")
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=POOL,
            timeout=REDIS_TIMEOUT,  # (a connection free within the timeout, else this call goes on alone)
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            retry_on_timeout=False,
        )
        self.redis: Any = aioredis.Redis(connection_pool=pool)
        self._claim = self.redis.register_script(_CLAIM)
        self._renew = self.redis.register_script(_RENEW)
        self._drop = self.redis.register_script(_DROP)
        self._held: dict[Digest, _Held] = {}
        self.down_since: float | None = None  # monotonic time Redis last failed us, while it does
        self.last_error = ""
        self._last_ok = 0.0
        self._last_try = 0.0
        self.on_call: Callable[[str], None] | None = None  # counts each call by purpose (the metrics)

    # -- calling Redis -------------------------------------------------------------------------------------

    async def _call(self, what: str, work: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T | None:
        """``work(*args, **kwargs)``'s result, or None when Redis did not answer (the node then goes on alone)."""
        now = time.monotonic()
        if self.down_since is not None and now - self._last_try < DOWN_RETRY:
            return None
        if self.on_call is not None:
            self.on_call(what)
        self._last_try = now
        try:
            async with asyncio.timeout(REDIS_TIMEOUT * 2):
                result = await work(*args, **kwargs)
        except (RedisError, OSError, TimeoutError) as exc:
            if self.down_since is None:
                self.down_since = now
                log.warning("redis at %s does not answer (%s): this node goes on alone: %s", self.url, what, exc)
            self.last_error = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
            return None
        if self.down_since is not None:
            log.warning("redis at %s answers again after %.0fs", self.url, now - self.down_since)
            self.down_since = None
        self._last_ok = time.monotonic()
        return result

    async def check(self) -> str | None:
        """None when Redis answers (asked at most every few seconds), else why this node is alone."""
        if self.down_since is None and time.monotonic() - self._last_ok < DOWN_RETRY:
            return None
        await self._call("ping", self.redis.ping)
        return None if self.down_since is None else f"redis down ({self.last_error}): local single-flight only"

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- leases --------------------------------------------------------------------------------------------

    async def claim(self, digest: Digest) -> Claim:
        """The lease of ``digest``'s fetch: this node's (taken now, or already), or the holder's."""
        held = self._held.get(digest)
        if held is not None:
            return _parse(held.value, True)
        ms = str(int(self.lease_ttl * 1000))
        lease = self.key("lease", str(digest))
        for _ in range(2):
            answer = await self._call("lease", self._claim, keys=[lease, self.key("fence")], args=[self.node_url, ms])
            if answer is None:
                return Claim(self.node_url, 0, True)  # alone: this node fetches it, as a single node would
            text, granted = _text(answer[0]), bool(int(answer[1]))
            if digest in self._held:  # taken by another request of ours meanwhile
                return _parse(self._held[digest].value, True)
            if granted:
                task = asyncio.get_running_loop().create_task(self._keep(digest, text), name=f"lease {digest}")
                self._held[digest] = _Held(text, task)
                return _parse(text, True)
            claim = _parse(text, False)
            if claim.owner != self.node_url:
                return claim
            # Ours by URL and not held: left by an earlier run of this node, which died holding it.
            await self._call("lease", self._drop, keys=[lease], args=[text])
        return Claim(self.node_url, 0, True)

    async def _keep(self, digest: Digest, value: str) -> None:
        ms = str(int(self.lease_ttl * 1000))
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            kept = await self._call("renew", self._renew, keys=[self.key("lease", str(digest))], args=[value, ms])
            if kept == 0:
                log.warning("lease of %s lost (this node was too slow to renew it): another node may fetch it", digest)
                return

    async def release(self, digest: Digest) -> None:
        """This node's fetch of ``digest`` ended (committed or failed): the next miss anywhere may start one."""
        held = self._held.pop(digest, None)
        if held is None:
            return
        held.renewer.cancel()
        await self._call("release", self._drop, keys=[self.key("lease", str(digest))], args=[held.value])

    # -- the internal endpoint's signature -----------------------------------------------------------------

    def sign(self, digest: Digest) -> str:
        return self._signer.sign(digest)

    def signed(self, digest: Digest, value: str | None) -> bool:
        return self._signer.signed(digest, value)

    # -- shared memory of the upstream's answers -----------------------------------------------------------

    async def remembered(self, key: tuple[str, ...]) -> bool:
        return bool(await self._call("negative", self.redis.exists, self._memo(key)))

    async def remember(self, key: tuple[str, ...], ttl: float) -> None:
        if ttl > 0:
            await self._call("negative", self.redis.set, self._memo(key), b"1", px=int(ttl * 1000))

    async def first(self, key: tuple[str, ...], ttl: float) -> bool:
        """Whether this node is the first to ask for ``key`` in ``ttl`` seconds (True while Redis is down)."""

        async def take() -> bool:
            return bool(await self.redis.set(self._memo(("once", *key)), b"1", nx=True, px=int(ttl * 1000)))

        got = await self._call("once", take)  # (None: Redis did not answer; False: another node has it)
        return got is None or got

    def _memo(self, key: tuple[str, ...]) -> str:
        return self.key("memo", hashlib.sha256("\0".join(key).encode()).hexdigest())

    # -- usage ---------------------------------------------------------------------------------------------

    async def add_usage(self, month: str, deltas: dict[str, int]) -> dict[str, int] | None:
        """Add this node's new bytes per user to the month's running totals; everyone's totals as they are
        now (None: Redis down, nothing added)."""
        key = self.key("usage", month)

        async def work() -> dict[str, int]:
            pipe = self.redis.pipeline(transaction=True)
            for user, n in deltas.items():
                pipe.hincrby(key, user, n)
            pipe.expire(key, USAGE_DAYS * 86400)
            pipe.hgetall(key)
            out = await pipe.execute()
            return {_text(k): int(v) for k, v in out[-1].items()}

        return await self._call("usage", work)

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        for digest in list(self._held):
            await self.release(digest)
        with contextlib.suppress(RedisError, OSError):
            await self.redis.aclose()


def _parse(value: str, mine: bool) -> Claim:
    token, _, owner = value.partition(" ")
    return Claim(owner, int(token) if token.isdigit() else 0, mine)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
