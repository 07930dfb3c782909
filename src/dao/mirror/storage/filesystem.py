"""The zero-setup backend: blobs and manifests under one data directory.

Layout (all writes are temp file + fsync + rename, so a crash leaves old or new, never half):

    blobs/sha256/ab/abcdef...        committed blobs, named by digest
    manifests/sha256/ab/abcdef...    manifest bodies; ``.type`` beside each holds the media type
    tags/<upstream>/<repo>/<tag>/<accept-key>.json
    origins/sha256/ab/abcdef...      "<registry>/<repository> <0|1 credentialed>" lines: where a digest was seen
    tmp/                             spool files of fetches in progress; emptied at start-up

A blob's last use is its file's mtime, written in batches from the :class:`AccessLog`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import stat as stat_mod
import tempfile
from collections.abc import Iterable
from pathlib import Path

from dao.mirror.storage.access import AccessLog, blob_path
from dao.mirror.storage.base import LocalBlob, ManifestRecord, Origin, Stored
from dao.oci.digest import Digest, DigestError
from dao.oci.manifest import descriptors


def _digest_path(root: Path, digest: Digest) -> Path:
    return root / digest.algorithm / digest.encoded[:2] / digest.encoded


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix="w-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _walk(base: Path) -> Iterable[tuple[str, Path, os.stat_result]]:
    """(digest, path, stat) of every item under a digest-named tree; ``.type`` files ride with their manifest."""
    if not base.is_dir():
        return
    for algorithm in base.iterdir():
        for prefix in algorithm.iterdir() if algorithm.is_dir() else ():
            for path in prefix.iterdir():
                if path.suffix:
                    continue
                try:
                    Digest.parse(f"{algorithm.name}:{path.name}")
                    st = path.stat()
                except (DigestError, FileNotFoundError):
                    continue
                yield f"{algorithm.name}:{path.name}", path, st


class FilesystemBlobStore:
    def __init__(self, root: Path, access: AccessLog | None = None) -> None:
        """``access`` learns of every blob served (its last use, and who is reading it) for eviction."""
        self.root = root
        self.access = access or AccessLog()
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        for d in (self.blobs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def clean_spool(self) -> int:
        """Remove spool files left by a process that died mid-fetch; call before serving."""
        removed = 0
        for entry in self.tmp.iterdir():
            if entry.is_file():
                entry.unlink(missing_ok=True)
                removed += 1
        return removed

    def spool_dir(self) -> Path:
        return self.tmp

    async def stat(self, digest: Digest) -> int | None:
        try:
            st = await asyncio.to_thread(os.stat, _digest_path(self.blobs, digest))
        except FileNotFoundError:
            return None
        return st.st_size if stat_mod.S_ISREG(st.st_mode) else None

    async def open(self, digest: Digest) -> LocalBlob | None:
        blob = await asyncio.to_thread(self._open, _digest_path(self.blobs, digest))
        if blob is not None:
            name = str(digest)
            self.access.touch(name)
            self.access.opened(name)
            blob.on_close = functools.partial(self.access.closed, name)
        return blob

    @staticmethod
    def _open(path: Path) -> LocalBlob | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError:
            return None  # ELOOP: a symlink is never a blob of ours
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        return LocalBlob(fd, st.st_size)

    async def commit(self, digest: Digest, spool_path: Path) -> None:
        await asyncio.to_thread(self._commit, digest, spool_path)

    def _commit(self, digest: Digest, spool_path: Path) -> None:
        final = _digest_path(self.blobs, digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(spool_path, final)
        fsync_dir(final.parent)

    async def delete(self, digest: Digest) -> bool:
        try:
            await asyncio.to_thread(os.unlink, _digest_path(self.blobs, digest))
        except FileNotFoundError:
            return False
        return True

    # -- what eviction needs -------------------------------------------------------------------------------

    async def listing(self) -> list[Stored]:
        return await asyncio.to_thread(self._listing)

    def _listing(self) -> list[Stored]:
        self.access.persist(self.blobs)
        return [Stored(digest, st.st_size, st.st_mtime) for digest, _, st in _walk(self.blobs)]

    def in_use(self) -> set[str]:
        return set(self.access.reading)

    async def record_uses(self) -> None:
        await asyncio.to_thread(self.access.persist, self.blobs)

    async def spool_bytes(self) -> int:
        return await asyncio.to_thread(self._spool_bytes)

    def _spool_bytes(self) -> int:
        """Allocated blocks, not lengths: spool files fill out of order."""
        total = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.tmp):
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
        return total

    async def free_bytes(self) -> int | None:
        st = await asyncio.to_thread(os.statvfs, self.root)
        return st.f_bavail * st.f_frsize


class FilesystemManifestStore:
    def __init__(self, root: Path) -> None:
        self.manifests = root / "manifests"
        self.tags = root / "tags"
        self.tmp = root / "tmp"
        for d in (self.manifests, self.tags, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    async def get(self, digest: Digest) -> tuple[bytes, str] | None:
        return await asyncio.to_thread(self._get, digest)

    def _get(self, digest: Digest) -> tuple[bytes, str] | None:
        path = _digest_path(self.manifests, digest)
        try:
            body = path.read_bytes()
            media_type = path.with_suffix(".type").read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        # Written before the .type file and never changed: a body that does not hash is damage, not a hit.
        if Digest.of(body, digest.algorithm) != digest:
            return None
        return body, media_type

    async def put(self, digest: Digest, body: bytes, media_type: str) -> None:
        await asyncio.to_thread(self._put, digest, body, media_type)

    def _put(self, digest: Digest, body: bytes, media_type: str) -> None:
        path = _digest_path(self.manifests, digest)
        atomic_write(path, body, self.tmp)
        atomic_write(path.with_suffix(".type"), media_type.encode(), self.tmp)

    def _tag_path(self, upstream: str, repo: str, tag: str, accept_key: str) -> Path:
        # repo and tag were validated against the reference grammar: no "..", no empty components.
        return self.tags / upstream.replace(":", "_") / repo / tag / f"{accept_key}.json"

    async def get_tag(self, upstream: str, repo: str, tag: str, accept_key: str) -> ManifestRecord | None:
        path = self._tag_path(upstream, repo, tag, accept_key)
        try:
            return ManifestRecord.from_json(await asyncio.to_thread(path.read_bytes))
        except (FileNotFoundError, NotADirectoryError):
            return None

    async def put_tag(self, upstream: str, repo: str, tag: str, accept_key: str, record: ManifestRecord) -> None:
        path = self._tag_path(upstream, repo, tag, accept_key)
        await asyncio.to_thread(atomic_write, path, record.to_json(), self.tmp)

    # -- what eviction needs -------------------------------------------------------------------------------

    async def listing(self) -> list[Stored]:
        return await asyncio.to_thread(self._listing)

    def _listing(self) -> list[Stored]:
        out = []
        for digest, path, st in _walk(self.manifests):
            try:
                size = st.st_size + path.with_suffix(".type").stat().st_size
            except FileNotFoundError:
                size = st.st_size
            out.append(Stored(digest, size, st.st_mtime))
        return out

    async def references(self, digests: list[str]) -> dict[str, list[str]]:
        return await asyncio.to_thread(self._references, digests)

    def _references(self, digests: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for digest in digests:
            try:
                out[digest] = [str(d.digest) for d in descriptors(blob_path(self.manifests, digest).read_bytes())]
            except (OSError, ValueError, KeyError, TypeError):
                out[digest] = []
        return out

    async def delete(self, digests: set[str]) -> int:
        return await asyncio.to_thread(self._delete, digests)

    def _delete(self, digests: set[str]) -> int:
        removed = 0
        for digest in digests:
            path = blob_path(self.manifests, digest)
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            path.with_suffix(".type").unlink(missing_ok=True)
            removed += 1
        for record in self.tags.rglob("*.json"):  # the tags that resolve to them are gone with them
            try:
                if json.loads(record.read_bytes()).get("digest") in digests:
                    record.unlink()
            except (OSError, ValueError, AttributeError):
                continue
        return removed


class FilesystemOrigins:
    """Origins of digests (blobs and manifests share one digest space), one small append-only file each."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "origins"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._known: dict[Digest, set[Origin]] = {}  # read once per digest, then kept

    async def origins(self, digest: Digest) -> set[Origin]:
        known = self._known.get(digest)
        if known is None:
            known = self._known[digest] = await asyncio.to_thread(self._read, digest)
            if len(self._known) > 100_000:
                self._known.clear()  # a bound, not a cache policy: they are re-read when needed
        return known

    def _read(self, digest: Digest) -> set[Origin]:
        try:
            text = _digest_path(self.dir, digest).read_text()
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            return set()
        found = set()
        for line in text.splitlines():
            name, _, flag = line.rpartition(" ")
            registry, _, repository = name.partition("/")
            if registry and repository:
                found.add(Origin(registry, repository, flag == "1"))
        return found

    async def add_origin(self, digest: Digest, origin: Origin) -> None:
        known = await self.origins(digest)
        if origin in known:
            return
        known.add(origin)
        line = f"{origin.registry}/{origin.repository} {int(origin.credentialed)}\n"
        await asyncio.to_thread(self._append, digest, line)

    def _append(self, digest: Digest, line: str) -> None:
        path = _digest_path(self.dir, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:  # one short O_APPEND write: lines never interleave
            f.write(line)

    async def forget(self, digest: str) -> None:
        """The digest left the cache (eviction)."""
        with contextlib.suppress(DigestError):
            self._known.pop(Digest.parse(digest), None)
        await asyncio.to_thread(blob_path(self.dir, digest).unlink, missing_ok=True)
