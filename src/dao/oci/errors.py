"""Registry error codes (OCI distribution spec, "Error Codes") and the JSON error body.

Handlers raise :class:`RegistryError`; one dispatcher turns it into the response, so the status and the
``{"errors": [...]}`` body always agree.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any


class ErrorCode(Enum):
    # value: (HTTP status, default message)
    BLOB_UNKNOWN = (404, "blob unknown to registry")
    BLOB_UPLOAD_INVALID = (400, "blob upload invalid")
    BLOB_UPLOAD_UNKNOWN = (404, "blob upload unknown to registry")
    DIGEST_INVALID = (400, "provided digest did not match uploaded content")
    MANIFEST_BLOB_UNKNOWN = (404, "manifest references a manifest or blob unknown to registry")
    MANIFEST_INVALID = (400, "manifest invalid")
    MANIFEST_UNKNOWN = (404, "manifest unknown to registry")
    TAG_INVALID = (400, "manifest tag did not match URI")
    NAME_INVALID = (400, "invalid repository name")
    NAME_UNKNOWN = (404, "repository name not known to registry")
    SIZE_INVALID = (400, "provided length did not match content length")
    UNAUTHORIZED = (401, "authentication required")
    DENIED = (403, "requested access to the resource is denied")
    UNSUPPORTED = (405, "the operation is unsupported")
    TOOMANYREQUESTS = (429, "too many requests")
    RANGE_INVALID = (416, "requested range not satisfiable")
    UNAVAILABLE = (503, "service unavailable")
    UPSTREAM_ERROR = (502, "upstream registry error")
    UNKNOWN = (500, "unknown error")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def default_message(self) -> str:
        return self.value[1]


class RegistryError(Exception):
    """An error a registry reports to its client. ``status`` defaults to the code's own."""

    def __init__(
        self,
        code: ErrorCode,
        message: str | None = None,
        *,
        detail: Any = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.code = code
        self.message = message or code.default_message
        self.detail = detail
        self.status = status or code.status
        self.headers = headers or {}
        super().__init__(f"{code.name}: {self.message}")

    def body(self) -> bytes:
        return error_body([(self.code.name, self.message, self.detail)])


def error_body(errors: list[tuple[str, str, Any]]) -> bytes:
    items = []
    for code, message, detail in errors:
        item: dict[str, Any] = {"code": code, "message": message}
        if detail is not None:
            item["detail"] = detail
        items.append(item)
    return json.dumps({"errors": items}).encode()


def parse_error_body(body: bytes, limit: int = 64 * 1024) -> list[tuple[str, str]]:
    """Codes and messages from a registry's error body; tolerant of anything that is not one."""
    try:
        doc = json.loads(body[:limit])
    except (ValueError, UnicodeDecodeError):
        return []
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list):
        return []
    out = []
    for item in errors:
        if isinstance(item, dict):
            out.append((str(item.get("code", "UNKNOWN")), str(item.get("message", ""))))
    return out
