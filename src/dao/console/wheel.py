"""The dao wheel the console hands its hosts (``install.sh`` installs it), built at start-up from the dao
the console itself runs: the same code on every host as on the console, whether dao was installed from a
wheel or from a source checkout, with no build tools needed.

A wheel is a zip of the package's files and a ``.dist-info`` (PEP 427): the metadata is dao's own, as
installed (its dependencies included, so pip fetches those from the package index), and ``RECORD`` lists
every file with its SHA-256.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from importlib import metadata
from pathlib import Path

import dao

SKIP_DIRS = {"__pycache__"}
SKIP_SUFFIXES = (".pyc", ".pyo")


def wheel_name() -> str:
    return f"dao-{dao.__version__}-py3-none-any.whl"


def build(dest: Path) -> Path:
    """Write the wheel into ``dest`` (whole or not at all) and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    package = Path(dao.__file__).parent
    info = f"dao-{dao.__version__}.dist-info"
    dist = metadata.distribution("dao")
    files: list[tuple[str, bytes]] = []
    for path in sorted(package.rglob("*")):
        if path.is_dir() or SKIP_DIRS & set(path.relative_to(package).parts) or path.suffix in SKIP_SUFFIXES:
            continue
        files.append((f"dao/{path.relative_to(package).as_posix()}", path.read_bytes()))
    files.append((f"{info}/METADATA", (dist.read_text("METADATA") or _metadata()).encode()))
    files.append((f"{info}/entry_points.txt", (dist.read_text("entry_points.txt") or _entry_points()).encode()))
    files.append((f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: dao\nRoot-Is-Purelib: true\nTag: py3-none-any\n"))
    record = "".join(f"{name},sha256={_digest(data)},{len(data)}\n" for name, data in files) + f"{info}/RECORD,,\n"
    files.append((f"{info}/RECORD", record.encode()))
    target = dest / wheel_name()
    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files:
            zf.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
    partial.replace(target)
    return target


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _metadata() -> str:
    return f"Metadata-Version: 2.1\nName: dao\nVersion: {dao.__version__}\n"


def _entry_points() -> str:
    return "[console_scripts]\ndao = dao.cli:main\n"
