"""The credentials ``docker login`` left behind: ``$DOCKER_CONFIG/config.json`` (default ``~/.docker``).

Looked up the way the docker CLI does: ``credHelpers[<host>]``, else ``credsStore``, run as
``docker-credential-<name> get`` with the server on stdin; else ``auths[<host>].auth`` (base64 ``user:pass``).
Docker Hub's entry is keyed ``https://index.docker.io/v1/``. A helper that is not installed means anonymous
with a warning -- the pull may still work for public images -- rather than an error.
"""

from __future__ import annotations

import base64
import binascii
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from dao.oci.reference import DOCKER_HUB_NAMES
from dao.paths import docker_config_dir
from dao.registry.credentials import Credentials

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
HELPER_TIMEOUT = 30


def config_path() -> Path:
    return docker_config_dir() / "config.json"


def credentials_for(host: str, *, warn: Callable[[str], None], path: Path | None = None) -> Credentials | None:
    """Credentials for a registry host (``ghcr.io``, ``127.0.0.1:5000``, ``docker.io``), or None."""
    path = path or config_path()
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        warn(f"cannot read {path} ({exc}); pulling anonymously")
        return None
    if not isinstance(doc, dict):
        return None
    keys = [DOCKER_HUB_KEY, "docker.io", "index.docker.io"] if host in DOCKER_HUB_NAMES else [host]
    keys += [f"https://{k}" for k in keys if "://" not in k] + [f"http://{k}" for k in keys if "://" not in k]
    helpers = doc.get("credHelpers") if isinstance(doc.get("credHelpers"), dict) else {}
    helper = next((helpers[k] for k in keys if k in helpers), None) or doc.get("credsStore")
    if isinstance(helper, str) and helper:
        return _from_helper(helper, keys[0], warn)
    auths = doc.get("auths") if isinstance(doc.get("auths"), dict) else {}
    entry = next((auths[k] for k in keys if isinstance(auths.get(k), dict)), None)
    if entry is None:
        return None
    if entry.get("auth"):
        try:
            user, _, password = base64.b64decode(str(entry["auth"])).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            warn(f"the auth entry for {host} in {path} is not base64 user:password; pulling anonymously")
            return None
        return Credentials(user, password)
    if entry.get("username") and entry.get("password"):
        return Credentials(str(entry["username"]), str(entry["password"]))
    return None


def _from_helper(helper: str, server: str, warn: Callable[[str], None]) -> Credentials | None:
    program = f"docker-credential-{helper}"
    try:
        done = subprocess.run([program, "get"], input=server, capture_output=True, text=True, timeout=HELPER_TIMEOUT)
    except FileNotFoundError:
        warn(f"credential helper {program} is not installed; pulling anonymously")
        return None
    except subprocess.TimeoutExpired:
        warn(f"credential helper {program} did not answer in {HELPER_TIMEOUT}s; pulling anonymously")
        return None
    if done.returncode != 0:
        return None  # "credentials not found": the registry may not need any
    try:
        doc = json.loads(done.stdout)
        return Credentials(str(doc["Username"]), str(doc["Secret"]))
    except (ValueError, KeyError, TypeError):
        warn(f"credential helper {program} gave an answer that is not JSON; pulling anonymously")
        return None
