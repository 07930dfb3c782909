"""The one error type people see: a line of text, maybe a hint, and the exit status.

Every feature's own errors (bad settings, a refused reference, an unreachable engine, a plan that no longer
applies, ...) derive from :class:`DaoError`; ``dao.cli.main`` is the one place that prints them
(``dao: error: ...`` and ``hint: ...`` on stderr) and exits with their status, as ``mirror/app.py`` is the one
place that turns errors into HTTP answers. Exit statuses: 1 the work failed, 2 the command line or settings
are wrong (as for usage errors).
"""

from __future__ import annotations

USAGE = 2
FAILED = 1


class DaoError(Exception):
    exit_code: int = FAILED
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self)
