"""What can go wrong talking to a registry, as one tree; aiohttp's exceptions never escape the client.

RegistryClientError
├── UpstreamUnavailable      connection refused/reset, DNS, timeout, 5xx after retries, broken body
└── UpstreamStatusError      the registry answered with an unexpected status
    ├── UpstreamNotFound         404 (MANIFEST_UNKNOWN, BLOB_UNKNOWN, NAME_UNKNOWN)
    ├── UpstreamUnauthorized     401/403, or the token server refused
    └── UpstreamRateLimited      429 (Docker Hub's pull limit)
"""

from __future__ import annotations


class RegistryClientError(Exception):
    pass


class UpstreamUnavailable(RegistryClientError):
    pass


class UpstreamStatusError(RegistryClientError):
    def __init__(self, message: str, status: int = 0, codes: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.codes = codes


class UpstreamNotFound(UpstreamStatusError):
    pass


class UpstreamUnauthorized(UpstreamStatusError):
    pass


class UpstreamRateLimited(UpstreamStatusError):
    pass
