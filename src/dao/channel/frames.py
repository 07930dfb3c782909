"""The agent channel's frames: what the agent and the console say to each other over the one WebSocket.

Every frame is one JSON text message, an object with ``"t"`` naming its type. The reader never trusts the
other side: :func:`decode` checks the size, the type and every field's type before a frame exists, and
raises :class:`FrameError` (the connection then answers with a close code, never a traceback). Unknown
fields are ignored, so either side can add some without breaking the other; unknown types are refused.

Agent -> console: ``hello``, ``metrics``, ``state``, ``event``, ``result``, ``stream``, ``pong``.
Console -> agent: ``welcome``, ``command``, ``ack``, ``ping``. See ``docs/agent.md``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, get_type_hints

MAX_FRAME = 256 * 1024  # bytes of one frame; a state snapshot of a busy host fits many times over
MAX_BATCH = 500  # metric samples in one frame (an outage's backlog goes in several)
ID_MAX = 64  # characters of a command ID


class FrameError(ValueError):
    """A frame that is not one: too big, not JSON, an unknown type, a field of the wrong type."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: ClassVar[str] = ""


@dataclass(frozen=True, slots=True)
class Hello(Frame):
    """The agent's first frame on every connection: who it is and what it already did."""

    kind: ClassVar[str] = "hello"
    version: str  # dao's version on the host
    facts: dict[str, Any] = field(default_factory=dict)  # OS, kernel, CPUs, memory, Docker's version...
    done: list[str] = field(default_factory=list)  # IDs of commands it has run (so none is sent again)


@dataclass(frozen=True, slots=True)
class Welcome(Frame):
    kind: ClassVar[str] = "welcome"
    host: str  # the host's ID at the console
    ping_interval: float  # seconds; 3 missed pings mean the channel is dead, on either side


@dataclass(frozen=True, slots=True)
class Metrics(Frame):
    """Samples in order; ``seq`` is the last one's number, acknowledged by :class:`Ack` once stored."""

    kind: ClassVar[str] = "metrics"
    seq: int
    samples: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Ack(Frame):
    kind: ClassVar[str] = "ack"
    seq: int  # every sample up to this one is stored: the agent may forget them


@dataclass(frozen=True, slots=True)
class State(Frame):
    """The engine's state as a whole (containers, images, disk use): sent on connect and after events."""

    kind: ClassVar[str] = "state"
    containers: list[dict[str, Any]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    disk: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Event(Frame):
    """One engine event as it happened (a container died): the console need not wait for a snapshot."""

    kind: ClassVar[str] = "event"
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Command(Frame):
    kind: ClassVar[str] = "command"
    id: str  # unique per command, kept by the agent so a re-sent one never runs twice
    op: str  # one of the named operations; anything else is refused
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Result(Frame):
    kind: ClassVar[str] = "result"
    id: str
    ok: bool
    data: Any = None  # what the operation returned, or the error's message when not ok


@dataclass(frozen=True, slots=True)
class Stream(Frame):
    """A piece of a running command's output (log lines, pull progress); ``Result`` ends the stream."""

    kind: ClassVar[str] = "stream"
    id: str
    data: str


@dataclass(frozen=True, slots=True)
class Ping(Frame):
    kind: ClassVar[str] = "ping"
    at: float  # the sender's clock, echoed in the pong: the round trip is measured without a shared clock


@dataclass(frozen=True, slots=True)
class Pong(Frame):
    kind: ClassVar[str] = "pong"
    at: float


@dataclass(frozen=True, slots=True)
class Peers(Frame):
    """Console -> agent: the user's other hosts whose local accelerators serve peers, and the secret they
    sign their requests with; sent when the host connects and whenever that set changes."""

    kind: ClassVar[str] = "peers"
    secret: str
    urls: list[str] = field(default_factory=list)


TYPES: dict[str, type[Frame]] = {
    cls.kind: cls for cls in (Hello, Welcome, Metrics, Ack, State, Event, Command, Result, Stream, Ping, Pong, Peers)
}
_CHECKS: dict[Any, type | tuple[type, ...]] = {
    str: str,
    bool: bool,
    int: int,
    float: (int, float),
    "Any": object,
}


def encode(frame: Frame) -> str:
    text = json.dumps({"t": frame.kind, **asdict(frame)}, separators=(",", ":"))
    if len(text.encode()) > MAX_FRAME:
        raise FrameError(f"{frame.kind} frame of {len(text)} bytes is over {MAX_FRAME}")
    return text


def decode(text: str | bytes) -> Frame:
    if len(text) > MAX_FRAME:
        raise FrameError(f"frame of {len(text)} bytes is over {MAX_FRAME}")
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FrameError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FrameError("a frame is a JSON object")
    cls = TYPES.get(doc.get("t"))  # type: ignore[arg-type]
    if cls is None:
        raise FrameError(f"unknown frame type {str(doc.get('t'))[:40]!r}")
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in doc:
            continue  # a default applies, or the constructor names what is missing
        values[f.name] = _check(cls.kind, f.name, hints[f.name], doc[f.name])
    try:
        frame = cls(**values)
    except TypeError:
        missing = [f.name for f in fields(cls) if f.name not in values]
        raise FrameError(f"{cls.kind} frame without {', '.join(missing)}") from None
    _limits(frame)
    return frame


def _check(kind: str, name: str, hint: Any, value: Any) -> Any:
    origin = getattr(hint, "__origin__", None)
    wanted: type | tuple[type, ...]
    if origin is list:
        wanted = list
    elif origin is dict:
        wanted = dict
    elif hint is Any:
        return value
    else:
        wanted = _CHECKS.get(hint, hint)
    if isinstance(value, bool) and wanted in (int, (int, float)):
        raise FrameError(f"{kind}.{name}: a number, not {value!r}")
    if not isinstance(value, wanted):
        raise FrameError(f"{kind}.{name}: wrong type {type(value).__name__}")
    if origin is list and hint.__args__[0] is str and not all(isinstance(v, str) for v in value):
        raise FrameError(f"{kind}.{name}: a list of strings")
    objects = origin is list and getattr(hint.__args__[0], "__origin__", None) is dict
    if objects and not all(isinstance(v, dict) for v in value):
        raise FrameError(f"{kind}.{name}: a list of objects")
    return value


def _limits(frame: Frame) -> None:
    if isinstance(frame, Command | Result | Stream) and not 0 < len(frame.id) <= ID_MAX:
        raise FrameError(f"{frame.kind}.id must be 1..{ID_MAX} characters")
    if isinstance(frame, Metrics) and len(frame.samples) > MAX_BATCH:
        raise FrameError(f"metrics frame of {len(frame.samples)} samples is over {MAX_BATCH}")
    if isinstance(frame, Hello) and len(frame.done) > 10_000:
        raise FrameError("hello frame names too many done commands")
    if isinstance(frame, Welcome) and not 0 < frame.ping_interval <= 3600:
        raise FrameError("welcome.ping_interval must be in (0, 3600] seconds")
