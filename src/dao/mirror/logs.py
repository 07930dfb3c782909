"""The mirror's logs: one access line a request, as text for people or JSON for log pipelines.

An access line says who (client address, the user's name -- never their address label or token, which are
secrets), what (method, path, the upstream registry it went to), how it ended (status, bytes sent, cache
outcome, duration, error) and which client program asked (``User-Agent``: docker, containerd, skopeo, dao).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from dao.mirror.state import state

LOG_FORMATS = ("text", "json")
USER_AGENT_MAX = 300


def configure(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("aiohttp.server").addFilter(BadRequestFilter())


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access lines carry their fields, other lines level, logger and message."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            doc.update(access)
        else:
            doc.update(level=record.levelname.lower(), logger=record.name, message=record.getMessage())
            if record.exc_info:
                doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        sent = state(request).sent
        if sent is None:  # small answers (errors, /v2/, metrics): their body, as for blobs and manifests
            body = response.body if isinstance(response, web.Response) else None
            sent = len(body) if isinstance(body, bytes) else response.body_length
        fields: dict[str, Any] = {
            "client": request.remote,
            "user": state(request).user_name,
            "method": request.method,
            "path": request.path_qs,
            "status": response.status,
            "bytes": sent,
            "cache": state(request).cache,
            "duration_ms": round(time * 1000, 1),
            "user_agent": (request.headers.get("User-Agent") or "")[:USER_AGENT_MAX],
            "registry": state(request).registry,
        }
        failure = state(request).failure
        if failure:
            fields["error"] = failure
        line = (
            f'{fields["client"]} "{request.method} {request.path_qs}" {response.status} {sent} '
            f"cache={fields['cache']} {fields['duration_ms']:.1f}ms"
        )
        if fields["user"]:
            line += f" user={json.dumps(fields['user'])}"
        if fields["registry"]:
            line += f" registry={fields['registry']}"
        line += f" ua={json.dumps(fields['user_agent'])}"
        if failure:
            line += f" error={failure!r}"
        self.logger.info(line, extra={"access": fields})

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


class BadRequestFilter(logging.Filter):
    """aiohttp logs a malformed request (oversized header, broken request line) with a traceback; it is the
    client's fault and already answered with 400, so one warning line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "bad request from client: %s", (str(exc).splitlines()[0][:200],)
        return True
