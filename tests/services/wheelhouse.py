"""A wheelhouse of dao's dependencies, repacked from this venv's installed distributions, so a test can run
the real ``install.sh`` (which pip-installs dao with its dependencies) inside a namespace with no network:
``PIP_NO_INDEX=1 PIP_FIND_LINKS=<wheelhouse>`` stands in for the package index.

Each installed distribution's files (its ``RECORD``) go back into a wheel with the tags its ``WHEEL`` file
names; scripts outside site-packages are left out (pip makes them again from the entry points).
"""

from __future__ import annotations

import base64
import hashlib
import re
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

_DROP = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}


def build(dest: Path, root: str = "dao") -> Path:
    """Every distribution ``root`` needs at run time (its extras not included), as wheels in ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    todo = [Requirement(r) for r in metadata.requires(root) or []]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        for extra in req.extras or {""}:
            name = _normal(req.name)
            if (name, extra) in seen:
                continue
            seen.add((name, extra))  # type: ignore[arg-type]
            dist = metadata.distribution(req.name)
            if extra == "":
                _repack(dist, dest)
            for sub in dist.requires or []:
                r = Requirement(sub)
                if r.marker is None or r.marker.evaluate({"extra": extra}):
                    r.marker = None
                    todo.append(r)
    return dest


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _repack(dist: metadata.Distribution, dest: Path) -> None:
    base = Path(str(dist.locate_file("")))
    tags = [
        line.split(": ", 1)[1].strip()
        for line in (dist.read_text("WHEEL") or "").splitlines()
        if line.startswith("Tag: ")
    ] or ["py3-none-any"]
    parts = [sorted({t.split("-")[i] for t in tags}) for i in range(3)]
    tag = "-".join(".".join(p) for p in parts)
    name = f"{_normal(dist.metadata['Name'])}-{dist.version}-{tag}.whl"
    records: list[str] = []
    info = None
    with zipfile.ZipFile(dest / name, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in dist.files or []:
            path = str(f)
            if path.startswith("..") or "__pycache__" in path or path.endswith(".pyc"):
                continue
            if ".dist-info/" in path:
                info = path.split("/", 1)[0]
                if path.rsplit("/", 1)[1] in _DROP:
                    continue
            data = (base / path).read_bytes()
            zf.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{path},sha256={digest},{len(data)}")
        assert info is not None, dist.metadata["Name"]
        zf.writestr(f"{info}/RECORD", "\n".join([*records, f"{info}/RECORD,,"]) + "\n")
