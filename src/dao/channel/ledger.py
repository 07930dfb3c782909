"""Which commands an agent has run, so each runs at most once even when the console sends it again (a
reconnect after the command was received but before its result arrived).

The ledger keeps each command's ID with its result, bounded (the oldest forgotten first), and saves itself
as JSON beside the agent's identity, so a restarted agent still knows. A command whose ID is known is not
run again: the agent answers with the recorded result (or "still running").
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

from dao.paths import write_private

RUNNING = object()  # the result of a command that has started and not ended


class Ledger:
    def __init__(self, path: Path | None = None, capacity: int = 1000) -> None:
        self.path = path
        self.capacity = capacity
        self._results: OrderedDict[str, Any] = OrderedDict()
        if path is not None:
            self._load(path)

    def begin(self, command_id: str) -> bool:
        """True when the command is new and may run now (it is recorded as running first, and saved, so a
        crash mid-run does not make it new again); False when it was seen before."""
        if command_id in self._results:
            return False
        self._results[command_id] = RUNNING
        self._trim()
        self.save()
        return True

    def end(self, command_id: str, ok: bool, data: Any) -> None:
        self._results[command_id] = {"ok": ok, "data": data}
        self.save()

    def result(self, command_id: str) -> dict[str, Any] | None:
        """The recorded result; ``{"ok": False, "data": "still running"}`` for one not ended; None when unknown."""
        value = self._results.get(command_id)
        if value is None:
            return None
        if value is RUNNING:
            return {"ok": False, "data": "still running"}
        return dict(value)

    def ids(self) -> list[str]:
        return list(self._results)

    def _trim(self) -> None:
        while len(self._results) > self.capacity:
            self._results.popitem(last=False)

    def save(self) -> None:
        if self.path is None:
            return
        doc = {k: ({"ok": False, "data": "interrupted"} if v is RUNNING else v) for k, v in self._results.items()}
        write_private(self.path, json.dumps(doc))

    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            return  # a damaged ledger is an empty one; the console's own record of results stays
        if isinstance(doc, dict):
            for k, v in doc.items():
                if isinstance(k, str) and isinstance(v, dict):
                    self._results[k] = v
        self._trim()
