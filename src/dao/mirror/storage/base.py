"""The storage capabilities the proxy is written against.

Contract shared by every backend:
- a blob is visible (``stat``/``open`` find it) only after :meth:`BlobIngester.commit`, which is atomic: a
  reader sees the whole verified blob or nothing, even if the process is killed at any instruction;
- the caller verifies the digest before ``commit``; backends trust it and do not re-hash;
- ``open`` hands back an open file the caller must close.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dao.oci.digest import Digest, DigestError


@dataclass(slots=True)
class LocalBlob:
    """An open regular file holding a committed blob; serve it with ``sendfile``. Caller closes ``fd``."""

    fd: int
    size: int
    on_close: Callable[[], None] | None = None

    def close(self) -> None:
        os.close(self.fd)
        if self.on_close is not None:
            self.on_close()


class BlobStatter(Protocol):
    async def stat(self, digest: Digest) -> int | None:
        """The committed blob's size, or None when absent."""


class BlobProvider(Protocol):
    async def open(self, digest: Digest) -> LocalBlob | None:
        """The committed blob opened for reading, or None when absent."""


class BlobIngester(Protocol):
    def spool_dir(self) -> Path:
        """A directory for blobs being fetched; on the same filesystem as the store so commit can rename."""

    async def commit(self, digest: Digest, spool_path: Path) -> None:
        """Make the verified, fsynced file at ``spool_path`` the blob ``digest``; takes ownership of the file."""


class BlobDeleter(Protocol):
    async def delete(self, digest: Digest) -> bool:
        """Remove the blob; True when it existed. Readers that already opened it keep reading."""


@dataclass(frozen=True, slots=True)
class Stored:
    """One committed blob or manifest as eviction sees it."""

    digest: str
    size: int  # what it takes in the store (a manifest: its body and media type)
    last_used: float  # wall-clock seconds


class BlobCollection(Protocol):
    """What eviction needs of a blob store: nothing here names a file."""

    async def listing(self) -> list[Stored]:
        """Every committed blob with its last use (uses noted since the last :meth:`record_uses` included)."""

    def in_use(self) -> set[str]:
        """Digests being read right now: not to be removed (a reader would keep its open file anyway)."""

    async def delete(self, digest: Digest) -> bool: ...

    async def record_uses(self) -> None:
        """Write the uses noted in memory where they survive a restart."""

    async def spool_bytes(self) -> int:
        """Space taken by fetches in progress: not removable, but it counts toward the limit."""

    async def free_bytes(self) -> int | None:
        """Free space where the store lives; None for a store without such a limit (object storage)."""


class BlobStore(BlobStatter, BlobProvider, BlobIngester, BlobDeleter, BlobCollection, Protocol):
    pass


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    """What a tag resolved to for one set of accepted media types, and when we last confirmed it."""

    digest: Digest
    media_type: str
    checked_at: float  # wall-clock seconds

    def to_json(self) -> bytes:
        """The record as every store keeps it (a file, an object in a bucket)."""
        return json.dumps(
            {"digest": str(self.digest), "media_type": self.media_type, "checked_at": self.checked_at}
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ManifestRecord | None:
        """None for a record that is not one (damaged, or from something else)."""
        try:
            doc = json.loads(data)
            return cls(Digest.parse(doc["digest"]), str(doc["media_type"]), float(doc["checked_at"]))
        except (ValueError, KeyError, TypeError, DigestError):
            return None


class ManifestCollection(Protocol):
    """What eviction needs of the manifests."""

    async def listing(self) -> list[Stored]:
        """Every stored manifest (last use: when it was stored)."""

    async def references(self, digests: list[str]) -> dict[str, list[str]]:
        """The digests each of these manifests names (its layers, config, or child manifests)."""

    async def delete(self, digests: set[str]) -> int:
        """Remove these manifests and the tag records that resolve to them; returns how many manifests went."""


class OriginForgetter(Protocol):
    async def forget(self, digest: str) -> None:
        """The digest left the cache."""


class ManifestStore(ManifestCollection, Protocol):
    async def get(self, digest: Digest) -> tuple[bytes, str] | None:
        """Body and media type of a manifest we verified, or None."""

    async def put(self, digest: Digest, body: bytes, media_type: str) -> None:
        """Store a verified manifest body (idempotent, atomic)."""

    async def get_tag(self, upstream: str, repo: str, tag: str, accept_key: str) -> ManifestRecord | None: ...

    async def put_tag(self, upstream: str, repo: str, tag: str, accept_key: str, record: ManifestRecord) -> None:
        """Record (atomically) what ``tag`` resolved to for clients with this accept key."""


@dataclass(frozen=True, slots=True)
class Origin:
    """A (registry, repository) a digest was fetched for, or confirmed upstream to belong to, and whether the
    mirror's own upstream credentials were used (so the content may be private to that account)."""

    registry: str
    repository: str
    credentialed: bool = False


class OriginStore(OriginForgetter, Protocol):
    async def origins(self, digest: Digest) -> set[Origin]:
        """Where ``digest`` (a blob or a manifest) was seen; empty when nothing was recorded."""

    async def add_origin(self, digest: Digest, origin: Origin) -> None:
        """Record one more; idempotent."""
