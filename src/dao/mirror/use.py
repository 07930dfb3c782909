"""``dao mirror use``: point this host's engines at a mirror, and undo it.

Three files, each changed as its owner expects:

- Docker's ``daemon.json``: the mirror goes first in ``registry-mirrors``; every other key and mirror is kept.
  ``registry-mirrors`` is one of the settings dockerd reloads on ``SIGHUP``, so no restart is needed.
- containerd's ``certs.d/<registry>/hosts.toml``: a file of ours naming the mirror as a pull/resolve host in
  front of the registry. A file that was there is kept as ``hosts.toml.dao-backup`` and put back by ``--off``.
  containerd reads these only when its CRI config sets ``config_path`` to that directory (we say so).
- podman/skopeo ``registries.conf``: a ``[[registry]]`` block for docker.io with the mirror, between marker
  comments; ``--off`` removes exactly that block. An existing docker.io block of the user's is a conflict
  (two blocks with one prefix are an error there): we leave the file alone and say why.

Every change is planned first (:class:`Change`: path, old text, new text), so ``--dry-run`` can print a
unified diff of exactly what a real run writes; a real run backs up ``daemon.json`` before the first change.
"""

from __future__ import annotations

import difflib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dao.errors import DaoError
from dao.oci.reference import DOCKER_HUB_URL

BEGIN = "# BEGIN dao mirror use"
END = "# END dao mirror use"
HOSTS_MARK = "# written by dao mirror use"
BACKUP_SUFFIX = ".dao-backup"
DOCKER_HUB_SERVER = DOCKER_HUB_URL


class UseError(DaoError):
    """A file we cannot read or understand; the message names it."""


@dataclass(frozen=True, slots=True)
class Change:
    path: Path
    before: str | None  # None: the file does not exist
    after: str | None  # None: remove the file
    note: str = ""
    backup: bool = False  # keep the old file as <path>.dao-backup before writing
    restore: bool = False  # put <path>.dao-backup back instead of writing ``after``

    @property
    def changes(self) -> bool:
        return self.before != self.after or self.restore

    def diff(self) -> str:
        old = (self.before or "").splitlines(keepends=True)
        new = (self.after or "").splitlines(keepends=True)
        label = str(self.path)
        return "".join(difflib.unified_diff(old, new, f"{label} (now)", f"{label} (after)"))


def check_url(url: str) -> str:
    split = urlsplit(url)
    if split.scheme not in ("http", "https") or not split.netloc or split.path not in ("", "/"):
        raise UseError(f"mirror URL must be http(s)://host[:port], got {url!r}")
    return f"{split.scheme}://{split.netloc}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UseError(f"cannot read {path}: {exc.strerror}") from exc


# -- docker -------------------------------------------------------------------------------------------------


def docker_change(daemon_json: Path, url: str, *, off: bool) -> Change:
    before = _read(daemon_json)
    try:
        doc = json.loads(before) if before and before.strip() else {}
    except ValueError as exc:
        raise UseError(f"{daemon_json} is not valid JSON ({exc}); fix it first") from exc
    if not isinstance(doc, dict):
        raise UseError(f"{daemon_json} is not a JSON object")
    mirrors = [m for m in doc.get("registry-mirrors") or [] if m.rstrip("/") != url]
    if not off:
        mirrors.insert(0, url)
    # An empty list, not a missing key: on SIGHUP dockerd only reloads the keys the file sets.
    doc["registry-mirrors"] = mirrors
    after = json.dumps(doc, indent=2) + "\n"
    if before is not None and json.loads(before or "{}") == doc:
        after = before  # same settings: leave the file's formatting alone
    note = "dockerd reloads registry-mirrors on SIGHUP; no restart needed"
    return Change(daemon_json, before, after, note, backup=before is not None and not off)


def reload_docker(pidfile: Path) -> str:
    """SIGHUP dockerd; returns what to tell the user."""
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return f"could not signal dockerd (no pid in {pidfile}): restart it, or run 'systemctl reload docker'"
    return f"dockerd (pid {pid}) reloaded its configuration"


# -- containerd ---------------------------------------------------------------------------------------------


def containerd_changes(certs_dir: Path, url: str, registries: list[str], *, off: bool) -> list[Change]:
    out = []
    for registry in registries:
        path = certs_dir / registry / "hosts.toml"
        before = _read(path)
        ours = before is not None and before.startswith(HOSTS_MARK)
        backup = path.with_name(path.name + BACKUP_SUFFIX)
        if off:
            if not ours:
                continue  # not ours to touch
            if backup.exists():
                out.append(Change(path, before, _read(backup), f"restores {backup.name}", restore=True))
            else:
                out.append(Change(path, before, None, "removes the file dao wrote"))
            continue
        server = DOCKER_HUB_SERVER if registry == "docker.io" else f"https://{registry}"
        after = (
            f"{HOSTS_MARK}; {'the previous file is ' + backup.name if before and not ours else 'remove to undo'}\n"
            f'server = "{server}"\n\n'
            f'[host."{url}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        )
        note = "containerd uses it when its config sets config_path to " + str(certs_dir)
        out.append(Change(path, before, after, note, backup=before is not None and not ours))
    return out


# -- podman / skopeo ----------------------------------------------------------------------------------------


def registries_conf_change(path: Path, url: str, *, off: bool) -> Change | None:
    before = _read(path)
    text = before or ""
    start, end = text.find(BEGIN), text.find(END)
    if start >= 0 and end > start:
        text = text[:start].rstrip("\n") + text[end + len(END) :].lstrip("\n")
        text = text + ("\n" if text and not text.endswith("\n") else "")
    if off:  # an emptied file was ours alone: it goes
        return Change(path, before, text if text.strip() else None, "removes dao's block")
    if 'prefix = "docker.io"' in text or "prefix = 'docker.io'" in text:
        return Change(path, before, before, f"{path} already has a docker.io block of its own; left unchanged")
    split = urlsplit(url)
    block = (
        f'{BEGIN}\n[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n\n[[registry.mirror]]\n'
        f'location = "{split.netloc}"\n' + ("insecure = true\n" if split.scheme == "http" else "") + f"{END}\n"
    )
    after = (text + ("\n" if text and not text.endswith("\n\n") else "") + block) if text else block
    return Change(path, before, after, "podman and skopeo read it on every run")


# -- applying -----------------------------------------------------------------------------------------------


def apply(change: Change) -> None:
    """Write one planned change atomically (temp file + rename), with its backup or restore."""
    path = change.path
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    if change.restore:
        os.replace(backup, path)
        return
    if change.after is None:
        path.unlink(missing_ok=True)
        return
    if change.before == change.after:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if change.backup and change.before is not None and not backup.exists():
        backup.write_text(change.before)
    tmp = path.with_name(f".{path.name}.dao-tmp")
    tmp.write_text(change.after)
    if path.exists():
        os.chmod(tmp, path.stat().st_mode & 0o7777)
    os.replace(tmp, path)
