"""A login for a registry, as ``docker login`` leaves it; apart from the client so that reading one (the
engine's own pull in ``dao pull``) costs no HTTP library."""

from __future__ import annotations

import base64
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""  # docker's refresh token (``identitytoken`` in config.json)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()
