"""Where dao keeps things on a host: root uses the system directories, a user the XDG ones (FHS and the XDG
Base Directory spec), and docker's own files stay where the docker CLI keeps them."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def _xdg(variable: str, fallback: str) -> Path:
    return Path(os.environ.get(variable) or Path.home() / fallback)


def data_dir() -> Path:
    """State that must survive: ``/var/lib/dao`` as root, else ``$XDG_DATA_HOME/dao`` (``~/.local/share``)."""
    return Path("/var/lib/dao") if os.geteuid() == 0 else _xdg("XDG_DATA_HOME", ".local/share") / "dao"


def cache_dir() -> Path:
    """What can be fetched again: ``/var/cache/dao`` as root, else ``$XDG_CACHE_HOME/dao`` (``~/.cache``)."""
    return Path("/var/cache/dao") if os.geteuid() == 0 else _xdg("XDG_CACHE_HOME", ".cache") / "dao"


def config_file() -> Path:
    """``$DAO_CONFIG``, else ``$XDG_CONFIG_HOME/dao/config.toml`` (``~/.config``) when it exists, else
    ``/etc/dao/config.toml``."""
    if os.environ.get("DAO_CONFIG"):
        return Path(os.environ["DAO_CONFIG"])
    home = _xdg("XDG_CONFIG_HOME", ".config") / "dao" / "config.toml"
    return home if home.exists() else Path("/etc/dao/config.toml")


def docker_config_dir() -> Path:
    """The docker CLI's directory (``config.json``, contexts, certificates): ``$DOCKER_CONFIG`` or ``~/.docker``."""
    return _xdg("DOCKER_CONFIG", ".docker")


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, readable by its owner only (mode 600 from the first byte) and whole or
    not at all: the agent's identity and its record of the commands it ran."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # two writers never share one
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
