"""One blob into a file: the mirror's upstream fetch, a :class:`~.fetch.Transfer` with one job, under the
mirror's rules. Its source is one upstream, or (the local accelerator) several sources at once: then the
transfer verifies the blob and blames a source that sent bad bytes, and no first answer is final (a 404
from one source sends the request to the next).

- **Every request asks for exactly the bytes it keeps**, so no byte crosses the uplink twice (a mirror's
  uplink is billed by the byte): the first request is ``Range: bytes=0-<first_chunk - 1>``: a blob smaller
  than that comes whole in one answer, and a bigger one's ``206`` says its size and that ranges work, so the
  other connections start at once, without a probe. An upstream that ignores ``Range`` answers ``200`` with
  the whole blob, and that one answer is read to the end. With one connection the first request is a plain
  ``GET``. Running chunks are never split (the first request's bytes in flight would be lost; the local
  accelerator, whose sources are the user's own, splits them near the end, as dao pull does).
- The chunks are taken from the front, so whoever follows the file sees a prefix that grows from the start;
  a reader waiting further on (a client's ``Range``) gets a connection of its own there (:meth:`want`).
- **Connections**: 6 to start with (the local accelerator: 16), more while the total rate still grows, up
  to ``max_connections``.
- **The first answer is the caller's**: a 404, 401 or 503 to the first request is raised as it is, so the
  mirror can pass it on; a transfer that breaks later is resumed from its first missing byte, with backoff,
  until ``resume_attempts`` requests in a row brought no new byte.

With one source nothing here hashes or commits: the listener hears the size once and every write, and decides
what the bytes are worth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence

from dao.oci.digest import Digest
from dao.registry.runs import Runs
from dao.transfer.fetch import Transfer, Unavailable
from dao.transfer.job import Job, Listener
from dao.transfer.schedule import Policy
from dao.transfer.sources import BlobSource, Peer

MiB = 1024 * 1024
START_CONNECTIONS = 6

_NO_DIGEST = Digest("sha256", "0" * 64)


def upstream_policy(max_connections: int = 24, first_chunk: int = MiB, **changes: object) -> Policy:
    """The mirror's rules (see the module's doc); ``changes`` override any :class:`Policy` field (tests)."""
    settings: dict[str, object] = {
        "connections": min(START_CONNECTIONS, max_connections),
        "max_connections": max_connections,
        "per_source": max_connections,
        "first_chunk": first_chunk,
        "chunk_min": 256 * 1024,
        "split": False,
        "resume_attempts": 5,
        "first_final": True,
        "backoff_base": 0.25,
        "backoff_max": 5.0,
    }
    settings.update(changes)
    return Policy(**settings)  # type: ignore[arg-type]


class Download:
    """``await Download(source, fd, listener, policy).run()`` returns the blob's size.

    Raises what the first request raised, or the last error once the source gave up; every connection is
    closed when anything fails."""

    def __init__(
        self,
        source: BlobSource | Sequence[Peer],
        fd: int,
        listener: Listener,
        policy: Policy | None = None,
        *,
        have: Runs | None = None,
        size: int | None = None,
        digest: Digest = _NO_DIGEST,
        url: str = "upstream",
        hasher: Callable[[], Awaitable[Digest]] | None = None,
    ) -> None:
        """``have``: byte runs the file already holds (a resumed download); only the rest is asked for.
        ``size``: the blob's size when the caller knows it. ``source``: several sources are verified
        (``self.verified``), so the caller need not hash the bytes again; ``hasher``: how, when the caller
        hashes them as they come anyway (see :class:`~.job.Job`)."""
        policy = policy or upstream_policy()
        self.verified = isinstance(source, Sequence)
        if isinstance(source, Sequence):
            peers = list(source)
            policy = dataclasses.replace(policy, first_final=False)
        else:
            peers = [Peer(url, lambda _, s=source: s)]  # type: ignore[misc]
        self.transfer = Transfer(peers, policy)
        self.job = Job(digest, size, fd, have=have, listener=listener, verify=self.verified, hasher=hasher)

    @property
    def streams(self) -> int:
        return self.transfer.streams.target

    async def run(self) -> int:
        async def one() -> None:
            self.transfer.add(self.job)
            await self.job.done

        try:
            await self.transfer.run([one()])
        except Unavailable as exc:
            raise (exc.last or exc) from None
        assert self.job.size is not None
        return self.job.size

    def want(self, pos: int) -> None:
        """A reader waits for byte ``pos``: if nobody is fetching it, a connection starts there."""
        self.transfer.want(self.job, pos)


__all__ = ["Download", "upstream_policy"]
