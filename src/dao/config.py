"""Settings: built-in defaults < TOML file (``--config`` / ``DAO_CONFIG``) < ``DAO_*`` environment < flags.

Each feature has one dataclass; its fields are the TOML keys of the feature's table (``[mirror]``), the
environment names upper-cased with the feature prefix (``DAO_MIRROR_MANIFEST_TTL``) and the flags with dashes
(``--manifest-ttl``). Bad values raise :class:`ConfigError` naming where the value came from.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_origin, get_type_hints
from urllib.parse import urlsplit

from dao.errors import USAGE, DaoError
from dao.oci.reference import DOCKER_HUB_URL
from dao.paths import data_dir


class ConfigError(DaoError, ValueError):
    exit_code = USAGE


def default_data_dir() -> Path:
    """Root keeps service data in /var/lib; a user in the XDG data directory."""
    return data_dir() / "mirror"


@dataclass(frozen=True)
class MirrorConfig:
    listen: str = "127.0.0.1:5000"
    upstream: str = DOCKER_HUB_URL  # Docker Hub's upstream
    registries: dict[str, str] = field(default_factory=dict)  # more registries (name -> URL), beside the built-in
    aliases: dict[str, str] = field(default_factory=dict)  # short path prefix -> registry name
    hosts: dict[str, str] = field(default_factory=dict)  # Host header -> registry name
    allow: tuple[str, ...] = ()  # globs on <registry>/<repository>; when set, one must match
    deny: tuple[str, ...] = ()  # globs on <registry>/<repository>; any match is refused
    data_dir: Path = field(default_factory=default_data_dir)
    manifest_ttl: float = 300.0  # seconds a tag's manifest is served without asking upstream
    manifest_timeout: float = 10.0  # seconds for an upstream manifest answer before serving stale / failing
    manifest_swr: float = 86400.0  # seconds past the TTL a tag is answered from cache while refreshed behind
    negative_ttl: float = 15.0  # seconds an upstream 404 is remembered
    breaker_failures: int = 5  # consecutive upstream failures that open the circuit
    breaker_cooldown: float = 15.0  # seconds the circuit stays open before one trial request
    prefetch_children: bool = True  # cache every child manifest of an index a client pulled
    fetch_connections: int = 24  # at most, for one big blob: it starts at 6 and adds while that is faster
    fetch_split_mib: float = 1.0  # blobs at least this big are fetched as parallel ranges
    max_fetches: int = 64  # upstream blob fetches at once; more wait (up to 30 s, then 429)
    max_fetches_per_client: int = 16  # of those, started by one client address
    max_connections_per_client: int = 64  # connections one client address may hold open
    header_timeout: float = 15.0  # seconds for a request's headers to arrive in full
    send_timeout: float = 30.0  # a response must send min_send_rate * send_timeout bytes every send_timeout s
    min_send_rate: str = "8KiB"  # bytes a second, averaged over each send_timeout window
    database: str = ""  # SQLAlchemy URL for users and usage; default sqlite:///<data_dir>/dao.db
    mirror_domain: str = ""  # users reach the mirror as <id>.<mirror_domain>
    anonymous: bool = True  # serve requests that name no user (counted as "anonymous")
    default_quota: str = "0"  # bytes a user may pull a month (50GiB, 500MB; 0 = no limit)
    usage_flush: float = 5.0  # seconds between writes of usage counts (and reads of users and quotas)
    cache_max: str = "0"  # size limit of the cache (blobs + manifests), e.g. 200GiB; 0 = none
    cache_min_free: str = "0"  # keep this much free on the cache's filesystem, e.g. 10GiB; 0 = none
    gc_interval: float = 60.0  # seconds between checks of those limits
    upstream_username: str = ""
    upstream_password: str = ""
    access_log: bool = True
    log_level: str = "info"
    log_format: str = "text"  # or json: one object per line, for log pipelines

    def __post_init__(self) -> None:
        split = urlsplit(self.upstream)
        if split.scheme not in ("http", "https") or not split.netloc or split.path not in ("", "/"):
            raise ConfigError(f"upstream must be http(s)://host[:port], got {self.upstream!r}")
        parse_listen(self.listen)
        for name, url in self.registries.items():
            split = urlsplit(url)
            if split.scheme not in ("http", "https") or not split.netloc or split.path not in ("", "/"):
                raise ConfigError(f"registry {name!r}: URL must be http(s)://host[:port], got {url!r}")
        if self.manifest_ttl < 0 or self.manifest_timeout <= 0 or self.manifest_swr < 0:
            raise ConfigError("manifest_ttl and manifest_swr must be >= 0, manifest_timeout > 0")
        if self.negative_ttl < 0 or self.breaker_cooldown < 0 or self.breaker_failures < 1:
            raise ConfigError("negative_ttl and breaker_cooldown must be >= 0, breaker_failures >= 1")
        if self.usage_flush <= 0 or self.gc_interval <= 0:
            raise ConfigError("usage_flush and gc_interval must be > 0")
        if not 1 <= self.fetch_connections <= 64 or self.fetch_split_mib <= 0:
            raise ConfigError("fetch_connections must be 1..64 and fetch_split_mib > 0")
        if self.max_fetches < 1 or self.max_fetches_per_client < 1 or self.max_connections_per_client < 1:
            raise ConfigError("max_fetches, max_fetches_per_client and max_connections_per_client must be >= 1")
        if self.header_timeout <= 0 or self.send_timeout <= 0:
            raise ConfigError("header_timeout and send_timeout must be > 0")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level must be debug, info, warning or error, got {self.log_level!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, got {self.log_format!r}")

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.data_dir}/dao.db"

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_listen(self.listen)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (all interfaces)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"listen must be HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


T = TypeVar("T")


def load(cls: type[T], section: str, *, file: Path | None, env: Mapping[str, str], flags: Mapping[str, Any]) -> T:
    """Build ``cls`` from the layers; ``flags`` holds only what the user actually passed (None = not given)."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    file = file or (Path(env["DAO_CONFIG"]) if env.get("DAO_CONFIG") else None)
    if file is not None:
        try:
            doc = tomllib.loads(file.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from exc
        table = doc.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] in {file} must be a table")
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in names:
                raise ConfigError(f"unknown setting {key!r} in [{section}] of {file}")
            values[name] = _coerce(hints[name], value, f"{file} [{section}] {key}")
    prefix = f"DAO_{section.upper()}_"
    for key, value in env.items():
        if key.startswith(prefix):
            name = key[len(prefix) :].lower()
            if name in names:
                values[name] = _coerce(hints[name], value, f"environment {key}")
    for name, value in flags.items():
        if value is not None:
            values[name] = _coerce(hints[name], value, f"--{name.replace('_', '-')}")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def _coerce(kind: Any, value: Any, where: str) -> Any:
    origin = get_origin(kind)
    if origin is dict:
        return _coerce_mapping(value, where)
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        return tuple(str(item).strip() for item in items if str(item).strip())
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is Path:
            return Path(str(value)).expanduser()
        if kind is float:
            return float(value)
        if kind is int:
            return int(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {value!r} is not a valid {getattr(kind, '__name__', kind)}") from exc


def _coerce_mapping(value: Any, where: str) -> dict[str, str]:
    """A TOML table, or ``KEY=VALUE`` items (a list from repeated flags, or one comma-separated string)."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    out = {}
    for item in items:
        key, sep, val = str(item).partition("=")
        if not sep or not key.strip() or not val.strip():
            raise ConfigError(f"{where}: {item!r} is not KEY=VALUE")
        out[key.strip()] = val.strip()
    return out
