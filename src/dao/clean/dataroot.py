"""The engine's data root, read and never written: what the Engine API does not tell.

The classic image store (moby ``layer/filestore.go``) keeps one directory per layer chain under
``image/<driver>/layerdb/sha256/<chain>/`` (``diff``, ``parent``, ``size``, ``cache-id``) and the layer's files
under ``<driver>/<cache-id>/``. From that we learn each layer's exact size (the number ``docker system df`` sums),
whether a layer's files are still there (a broken image's are not), and which layers no image references
(what an interrupted pull or a killed engine leaves). We only read; every removal goes through the engine.

Only usable when the engine's ``DockerRootDir`` is on this machine and readable (``sudo dao clean``); we check
it is the same engine by finding the API's image IDs in it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

# where each graph driver keeps a layer's files, relative to <root>/<driver>/
_LAYER_DIRS = {
    "overlay2": "{id}/diff",
    "fuse-overlayfs": "{id}/diff",
    "overlay": "{id}/root",
    "vfs": "dir/{id}",
    "btrfs": "subvolumes/{id}",
    "aufs": "diff/{id}",
}
_CHAIN = re.compile(rb"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Layer:
    chain: str  # sha256:...
    diff: str  # the layer's DiffID
    parent: str | None  # parent chain
    size: int  # bytes, as the engine recorded them (docker system df sums these)
    cache_id: str  # the graph driver's name for it
    mtime: float  # when the engine wrote its metadata
    files: Path | None  # the driver's directory of its files; None when the driver is unknown to us

    def missing(self) -> bool:
        return self.files is not None and not self.files.is_dir()


class DataRoot:
    def __init__(self, root: Path, driver: str) -> None:
        self.root = root
        self.driver = driver
        self.layerdb = root / "image" / driver / "layerdb"
        self.layers: dict[str, Layer] = {}
        for entry in sorted((self.layerdb / "sha256").iterdir()):
            layer = self._layer(entry)
            if layer is not None:
                self.layers[layer.chain] = layer

    @classmethod
    def open(cls, root: str, driver: str, image_ids: set[str], container_ids: set[str], local: bool) -> DataRoot | None:
        """The data root if it is here, readable, and the engine's own: its image DB and container directory
        hold the API's images and containers. An engine reached over TCP with nothing to compare could be
        another machine's with the same path; then we do not use it."""
        if not root or not driver or (not local and not image_ids and not container_ids):
            return None
        path = Path(root)
        content = path / "image" / driver / "imagedb" / "content" / "sha256"
        try:
            images = {"sha256:" + p.name for p in content.iterdir()}
            containers = {p.name for p in (path / "containers").iterdir()}
            if not image_ids <= images or not container_ids <= containers:
                return None
            return cls(path, driver)
        except OSError:
            return None

    def _layer(self, entry: Path) -> Layer | None:
        try:
            diff = (entry / "diff").read_text().strip()
            size = int((entry / "size").read_text().strip() or 0)
            cache_id = (entry / "cache-id").read_text().strip()
            parent_file = entry / "parent"
            parent = parent_file.read_text().strip() if parent_file.exists() else None
            mtime = entry.stat().st_mtime
        except (OSError, ValueError):
            return None  # half-written by an engine that died mid-write: the engine ignores it too
        pattern = _LAYER_DIRS.get(self.driver)
        files = self.root / self.driver / pattern.format(id=cache_id) if pattern else None
        return Layer("sha256:" + entry.name, diff, parent or None, size, cache_id, mtime, files)

    def mount_parents(self) -> set[str]:
        """Chains that containers' writable layers sit on (``layerdb/mounts/<container>/parent``)."""
        held = set()
        for mount in _listdir(self.layerdb / "mounts"):
            try:
                held.add((mount / "parent").read_text().strip())
            except OSError:
                continue
        return held

    def buildkit_chains(self) -> set[str]:
        """Chains BuildKit's snapshot DB names: the build cache holds them, so they are not orphans.

        The DB is bbolt; we look for chain IDs in its bytes instead of parsing it. Freed pages may keep stale
        IDs, which only makes us spare a layer we could have removed, never the other way round.
        """
        try:
            data = (self.root / "buildkit" / "snapshots.db").read_bytes()
        except OSError:
            return set()
        return {m.decode() for m in _CHAIN.findall(data)}

    def pull_in_progress(self, within: float = 600.0) -> str | None:
        """Evidence that the engine is pulling or loading right now: a pull's download temp files, a load's
        unpack directory or a layer write-set touched in the last ``within`` seconds (moby
        ``distribution/pull_v2.go``, ``image/tarexport/load.go``, ``layer/filestore.go``)."""
        now = time.time()
        tmp = self.root / "tmp"
        for pattern, where in (("GetImageBlob*", tmp), ("docker-import-*", tmp), ("write-set-*", self.layerdb / "tmp")):
            for path in _glob(where, pattern):
                try:
                    if now - path.stat().st_mtime < within:
                        return f"{path} was written {now - path.stat().st_mtime:.0f}s ago"
                except OSError:
                    continue
        return None


def _listdir(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError:
        return []


def _glob(path: Path, pattern: str) -> list[Path]:
    try:
        return sorted(path.glob(pattern))
    except OSError:
        return []
