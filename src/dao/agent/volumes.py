"""Copying an app replica's named volumes from one host to another, through the console (``docs/hosts.md``).

Hosts never connect to each other (each only dials out), so the console carries the copy, and it *pulls*:
the old host saves the volume's tar stream to a file (``volume.save``), the console reads it in pieces
(``volume.read``) and writes each piece to the new host (``volume.write``), which unpacks the whole, checked
against its size and SHA-256, into the new replica (``volume.restore``). One piece is in flight at a time, so
no side holds more than a piece in memory however big the volume, and a piece sent again after a link drop
lands on the same offset. The engine does the packing (``GET``/``PUT /containers/{id}/archive``), on the
replica's container itself, created and not started on the new host: no helper image.

Only a ``dao.app`` container's named-volume mount points can be read or written: the same reach the app's
compose file gave the console, and nothing of the host's own files.
"""

from __future__ import annotations

import base64
import hashlib
import posixpath
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from dao.agent.operations import Emit, OperationError, _container, _int, _on_engine
from dao.engine import Engine

PIECE = 128 * 1024  # bytes of one volume.read answer (its base64 fits a channel frame with room to spare)
KEPT = 3600.0  # seconds a transfer's file stays when nobody finishes or drops it
_TRANSFER = re.compile(r"[0-9a-f]{24}")

TRANSFERS = Path("/var/lib/dao/transfers")  # set by the agent to a directory in its state directory


def _transfer(args: dict[str, Any]) -> Path:
    value = args.get("transfer")
    if not isinstance(value, str) or not _TRANSFER.fullmatch(value):
        raise OperationError("args.transfer: a transfer ID (24 hex digits)")
    return TRANSFERS / f"{value}.tar"


def _sweep() -> None:
    TRANSFERS.mkdir(parents=True, exist_ok=True, mode=0o700)
    for old in TRANSFERS.glob("*.tar"):
        if time.time() - old.stat().st_mtime > KEPT:
            old.unlink(missing_ok=True)


async def _volume_mount(engine: Engine, container: str, path: Any) -> str:
    """``path`` when it is where a named volume is mounted in an app replica; refused otherwise."""
    if not isinstance(path, str) or not path.startswith("/") or posixpath.normpath(path) != path or path == "/":
        raise OperationError("args.path: the absolute path a named volume is mounted on")
    found = await engine.inspect_container(container)
    if "dao.app" not in ((found.get("Config") or {}).get("Labels") or {}):
        raise OperationError(f"{container} is not an app replica")
    if not any(m.get("Type") == "volume" and m.get("Destination") == path for m in found.get("Mounts") or []):
        raise OperationError(f"{container} has no named volume on {path}")
    return path


async def volume_save(args: dict[str, Any], emit: Emit) -> Any:
    """The tar stream of the volume on ``args.path`` of ``args.id`` (stopped, for a final copy), to a file."""
    container = _container(args)
    _sweep()
    transfer = secrets.token_hex(12)
    target = TRANSFERS / f"{transfer}.tar"

    async def call(engine: Engine) -> Any:
        path = await _volume_mount(engine, container, args.get("path"))
        digest, size = hashlib.sha256(), 0
        with target.open("wb") as out:
            async for chunk in engine.get_archive(container, path):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        return {"transfer": transfer, "size": size, "sha256": digest.hexdigest()}

    try:
        return await _on_engine(call)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


async def volume_read(args: dict[str, Any], emit: Emit) -> Any:
    path = _transfer(args)
    offset = _int(args, "offset", 0, 0, 2**50)
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read(PIECE)
    except FileNotFoundError:
        raise OperationError("no such transfer (finished, dropped, or older than an hour)") from None
    return {"data": base64.b64encode(data).decode(), "end": len(data) < PIECE}


async def volume_write(args: dict[str, Any], emit: Emit) -> Any:
    """A piece at ``args.offset``: a piece sent again (the same offset) overwrites itself, and nothing after
    it stays (the file is cut there), so a retried copy cannot leave a wrong byte in the middle."""
    path = _transfer(args)
    offset = _int(args, "offset", 0, 0, 2**50)
    data = args.get("data")
    if not isinstance(data, str):
        raise OperationError("args.data: the piece, in base64")
    try:
        piece = base64.b64decode(data, validate=True)
    except ValueError:
        raise OperationError("args.data is not base64") from None
    if offset == 0:
        _sweep()
        path.touch(mode=0o600)
    try:
        with path.open("r+b") as f:
            size = f.seek(0, 2)
            if offset > size:
                raise OperationError(f"a piece at {offset} after {size} bytes: a piece is missing")
            f.truncate(offset)
            f.seek(offset)
            f.write(piece)
    except FileNotFoundError:
        raise OperationError("no such transfer: write its first piece (offset 0) first") from None
    return {"size": offset + len(piece)}


async def volume_restore(args: dict[str, Any], emit: Emit) -> Any:
    """Unpack the transfer into the volume on ``args.path`` of ``args.id``, once it is whole and right."""
    container = _container(args)
    path = _transfer(args)
    size = _int(args, "size", 0, 0, 2**50)
    expected = args.get("sha256")
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
            got = f.tell()
    except FileNotFoundError:
        raise OperationError("no such transfer") from None
    if got != size or digest.hexdigest() != expected:
        raise OperationError(f"the copy is not whole: {got} of {size} bytes, sha256 {digest.hexdigest()[:12]}")

    async def body() -> AsyncIterator[bytes]:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk

    async def call(engine: Engine) -> Any:
        mount = await _volume_mount(engine, container, args.get("path"))
        # The archive's top entry is the directory itself (GET of /data holds data/...): unpacked in its parent.
        await engine.put_archive(container, posixpath.dirname(mount), body())
        return {"id": container, "path": mount, "size": size}

    result = await _on_engine(call)
    path.unlink(missing_ok=True)
    return result


async def volume_drop(args: dict[str, Any], emit: Emit) -> Any:
    _transfer(args).unlink(missing_ok=True)
    return {"dropped": True}


VOLUME_OPERATIONS = {
    "volume.save": volume_save,
    "volume.read": volume_read,
    "volume.write": volume_write,
    "volume.restore": volume_restore,
    "volume.drop": volume_drop,
}
