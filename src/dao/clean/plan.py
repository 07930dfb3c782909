"""What ``dao clean`` decided: the options it judged by, the items it would remove, and what it spared.

A plan is a value. ``dao clean -d --plan-out F`` writes it as JSON; ``dao clean --plan F`` reads it back and
removes exactly its items that a fresh scan with the same options still finds to be garbage. Sizes are what
``docker system df`` counts (``size``) plus what is on disk that df does not see (``hidden``: layers no image
references, left by interrupted pulls).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dao.errors import USAGE, DaoError

FORMAT = 1

# the kinds a user selects with --only/--skip, and the item kinds each one covers
KINDS: dict[str, tuple[str, ...]] = {
    "containers": ("container",),
    "images": ("image",),
    "volumes": ("volume",),
    "networks": ("network",),
    "build-cache": ("build-cache",),
    "broken": ("broken-image", "layer"),
}
DEFAULT_KINDS = ("containers", "images", "volumes", "networks", "broken")  # build cache only when asked


class PlanError(DaoError):
    """A plan file or an option is unusable; the message is one line for people."""

    exit_code = USAGE


@dataclass(frozen=True)
class Options:
    kinds: tuple[str, ...] = DEFAULT_KINDS
    grace: float = 3600.0  # seconds: nothing younger than this is touched
    until: float = 0.0  # seconds: containers must have finished at least this long ago
    images_unused: bool = False  # also tagged images no container uses, least recently used first
    keep_free: int | None = None  # with images_unused: stop once the data root's filesystem has this free
    volumes_named: bool = False  # also named volumes (anonymous ones always)
    keep: tuple[str, ...] = ()  # image reference patterns never removed (fnmatch on repo:tag)
    keep_label: str = "dao.keep=true"  # anything carrying this label is never removed

    def label(self) -> tuple[str, str]:
        key, _, value = self.keep_label.partition("=")
        return key, value


@dataclass
class Item:
    kind: str  # container, image, broken-image, layer, volume, network, build-cache
    id: str
    name: str
    reason: str
    size: int = 0  # bytes docker system df stops counting once it is gone
    hidden: int = 0  # bytes on disk that docker system df never counted
    last_used: float | None = None  # unix time of its last use, as well as the engine records it
    evidence: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # what removal needs (a layer's diff IDs, ...)

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.id


@dataclass
class Spared:
    kind: str
    id: str
    name: str
    rule: str  # which safety rule kept it


@dataclass
class Plan:
    host: str
    options: Options
    items: list[Item] = field(default_factory=list)
    spared: list[Spared] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the scan could not judge, and why
    created: float = field(default_factory=time.time)

    @property
    def size(self) -> int:
        return sum(item.size for item in self.items)

    @property
    def hidden(self) -> int:
        return sum(item.hidden for item in self.items)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["options"]["kinds"] = list(self.options.kinds)
        doc["options"]["keep"] = list(self.options.keep)
        return {"format": FORMAT, **doc, "size": self.size, "hidden": self.hidden}

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> Plan:
        try:
            return cls.from_json(json.loads(path.read_text()), str(path))
        except OSError as exc:
            raise PlanError(f"cannot read the plan {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise PlanError(f"{path}: not a dao clean plan ({exc})") from None

    @classmethod
    def from_json(cls, doc: Any, where: str = "the plan") -> Plan:
        """A plan from its JSON (a file, or one the console sends an agent back): checked, never trusted."""
        try:
            if doc.get("format") != FORMAT:
                raise PlanError(f"{where}: not a dao clean plan (format {doc.get('format')!r})")
            opts = doc["options"]
            options = Options(**{**opts, "kinds": tuple(opts["kinds"]), "keep": tuple(opts["keep"])})
            return cls(
                str(doc["host"]),
                options,
                [Item(**item) for item in doc["items"]],
                [Spared(**spared) for spared in doc.get("spared", [])],
                list(doc.get("notes", [])),
                float(doc["created"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PlanError(f"{where}: not a dao clean plan ({exc})") from None
