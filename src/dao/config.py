"""Settings: built-in defaults < TOML file (``--config`` / ``DAO_CONFIG``) < ``DAO_*`` environment < flags.

Each feature has one dataclass; its fields are the TOML keys of the feature's table (``[mirror]``), the
environment names upper-cased with the feature prefix (``DAO_MIRROR_MANIFEST_TTL``) and the flags with dashes
(``--manifest-ttl``). Each field is declared with :func:`setting`: its name, default and help in one place,
from which the command's options are made (:func:`dao.cliutil.with_settings`). Bad values raise
:class:`ConfigError` naming where the value came from.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_origin, get_type_hints
from urllib.parse import urlsplit

from dao.errors import USAGE, DaoError
from dao.oci.reference import DOCKER_HUB_URL
from dao.paths import data_dir

LOCAL_CACHE_MAX = "20GiB"


class ConfigError(DaoError, ValueError):
    exit_code = USAGE


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    factory: Callable[[], Any] | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    shown: str | None = None,
    cli: bool = True,
) -> Any:
    """A settings field. ``help`` is the option's help (the default is added to it: ``shown``, or the default
    itself); ``flag`` names the option when it is not the field's name with dashes (one value per repeat for
    dicts and tuples); ``cli=False``: file and environment only (a password)."""
    metadata = {"help": help, "flag": flag, "metavar": metavar, "shown": shown, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def shown_default(f: dataclasses.Field[Any]) -> str | None:
    """How ``--help`` shows a field's default (None: it shows none)."""
    if f.metadata.get("shown"):
        return str(f.metadata["shown"])
    value = f.default
    if value is dataclasses.MISSING or value in ("", None) or isinstance(value, (dict, tuple, list)):
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def default_data_dir() -> Path:
    """Root keeps service data in /var/lib; a user in the XDG data directory."""
    return data_dir() / "mirror"


@dataclass(frozen=True)
class MirrorConfig:
    listen: str = setting("127.0.0.1:5000", help="HOST:PORT to listen on.")
    upstream: str = setting(DOCKER_HUB_URL, help="Registry to mirror, http(s)://host[:port].")
    data_dir: Path = setting(
        factory=default_data_dir,
        shown="/var/lib/dao/mirror as root, else ~/.local/share/dao/mirror",
        help="Cache directory.",
    )
    registries: dict[str, str] = setting(
        factory=dict,
        flag="--registry",
        metavar="NAME=URL",
        help="NAME=URL: also mirror this registry (repeatable). Built in: docker.io (--upstream), ghcr.io, "
        "gcr.io, registry.k8s.io, k8s.gcr.io, quay.io, mcr.microsoft.com, public.ecr.aws, docker.elastic.co, "
        "nvcr.io.",
    )
    aliases: dict[str, str] = setting(
        factory=dict,
        flag="--alias",
        metavar="ALIAS=REGISTRY",
        help="ALIAS=REGISTRY: /v2/ALIAS/<repo> means REGISTRY/<repo> (repeatable).",
    )
    hosts: dict[str, str] = setting(
        factory=dict,
        flag="--host",
        metavar="HOSTNAME=REGISTRY",
        help="HOSTNAME=REGISTRY: requests sent to HOSTNAME are for REGISTRY (repeatable).",
    )
    allow: tuple[str, ...] = setting(
        (), metavar="GLOB", help="Only serve <registry>/<repository> matching one of these globs (repeatable)."
    )
    deny: tuple[str, ...] = setting(
        (), metavar="GLOB", help="Refuse <registry>/<repository> matching this glob (repeatable)."
    )
    manifest_ttl: float = setting(300.0, help="Seconds a tag's manifest is served before re-checking upstream.")
    manifest_timeout: float = setting(10.0, help="Seconds to wait for upstream manifest answers before serving stale.")
    manifest_swr: float = setting(
        86400.0,
        help="Seconds past the TTL a tag is answered from cache at once while it is re-checked in the "
        "background; later, the client waits for the check (0 = always wait).",
    )
    negative_ttl: float = setting(15.0, help="Seconds an upstream 'not found' is remembered.")
    breaker_failures: int = setting(
        5, help="Upstream failures in a row after which requests fail fast or come from cache."
    )
    breaker_cooldown: float = setting(15.0, help="Seconds before the upstream is tried again after that.")
    prefetch_children: bool = setting(
        True, help="Cache every platform's manifest when a client pulls a multi-platform index."
    )
    fetch_connections: int = setting(
        24,
        help="At most this many upstream connections for one big blob (it starts at 6, adds more while "
        "that makes it faster).",
    )
    fetch_split_mib: float = setting(1.0, help="Blobs at least this many MiB are fetched as parallel ranges.")
    max_fetches: int = setting(64, help="Upstream blob fetches at once; more wait, then get 429.")
    max_fetches_per_client: int = setting(16, help="Of those, started by one client address.")
    max_connections_per_client: int = setting(64, help="Connections one client address may hold open.")
    header_timeout: float = setting(15.0, help="Seconds for a request's headers to arrive in full.")
    send_timeout: float = setting(
        30.0, help="Every this many seconds a response must have sent --min-send-rate's worth."
    )
    min_send_rate: str = setting("8KiB", help="Bytes a second a client must read, e.g. 8KiB; slower ones are cut.")
    database: str = setting(
        "",
        shown="sqlite:///DATA_DIR/dao.db",
        help="SQLAlchemy URL.",
    )
    mirror_domain: str = setting(
        "", help="Users reach the mirror as http://<id>.<mirror-domain> (usage counted per user)."
    )
    anonymous: bool = setting(True, help="Serve requests that name no user, counted as 'anonymous'.")
    default_quota: str = setting("0", help="Bytes a user may pull a month, e.g. 50GiB; 0 = no limit.")
    usage_flush: float = setting(5.0, help="Seconds between usage writes and re-reads of users and quotas.")
    cache_max: str = setting("0", help="Size limit of the cache, e.g. 200GiB; 0 = none.")
    storage: str = setting(
        "",
        help="s3://BUCKET[/PREFIX]: blobs, manifests and tags in S3-compatible object storage that every node "
        "shares (endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); the data "
        "directory is then this node's cache in front of it. Empty: the data directory alone.",
    )
    s3_endpoint: str = setting(
        "", metavar="URL", help="With storage: the S3 endpoint, e.g. http://seaweed:8333. [default: AWS_ENDPOINT_URL]"
    )
    s3_region: str = setting("", help="With storage: the bucket's region. [default: AWS_DEFAULT_REGION, us-east-1]")
    s3_access_key: str = setting(
        "", cli=False, help="With storage: the access key ID (the file or DAO_MIRROR_S3_ACCESS_KEY; else AWS_*)."
    )
    s3_secret_key: str = setting(
        "", cli=False, help="With storage: the secret access key (the file or DAO_MIRROR_S3_SECRET_KEY; else AWS_*)."
    )
    redirect: bool = setting(
        False,
        help="With storage: answer a blob that is in the bucket but not on this node's disk with a 307 to a "
        "presigned URL, so its bytes never pass through the node.",
    )
    redirect_base: str = setting(
        "", help="With redirect: the URL of a CDN in front of the bucket, in place of the bucket's own."
    )
    redis: str = setting(
        "",
        metavar="URL",
        help="redis://HOST:PORT/DB: the nodes of a cluster agree there on who fetches each blob (one upstream "
        "transfer across them all), on users' usage and on the upstream's 404s. Needs --node-url and a "
        "cluster secret. Empty: this node alone.",
    )
    node_url: str = setting(
        "",
        metavar="URL",
        help="With redis: the URL the other nodes reach this node at, e.g. http://10.0.0.5:5000 (its "
        "/_dao/blobs/ serves them what it fetches).",
    )
    cluster_secret: str = setting(
        "",
        cli=False,
        help="With redis: the secret the nodes sign their requests to each other with (the file or "
        "DAO_MIRROR_CLUSTER_SECRET only).",
    )
    lease_ttl: float = setting(
        10.0, help="With redis: seconds a dead node's claim on a blob outlives it (then another node goes on)."
    )
    local: bool = setting(
        False,
        help="Run as this host's local accelerator: on loopback only, the engine's first registry mirror "
        "(dao mirror use --local); each blob from the --via accelerators, the --peer hosts and the registry "
        "at once, chunks to the fastest, every byte checked; the cache bounded (20GiB unless --cache-max).",
    )
    via: tuple[str, ...] = setting(
        factory=tuple,
        metavar="URL",
        help="With local: an accelerator to get Docker Hub images through (repeatable); manifests come from "
        "the first, blobs from all of them, the peers and the registry.",
    )
    step_aside: bool = setting(
        True,
        help="With local: when the first --via (or the registry) answers as fast as loopback and asks for no "
        "login, send the engine to it (a redirect) for each blob this host does not hold, instead of fetching "
        "it in between: on the same host or LAN that hop only costs CPU. Off: every blob goes through here.",
    )
    peer: tuple[str, ...] = setting(
        factory=tuple,
        metavar="URL",
        help="With local: another host's local accelerator, at its --peer-listen address (repeatable); blobs "
        "it has are fetched from it too. Needs the peer secret.",
    )
    peers_file: str = setting(
        "",
        metavar="FILE",
        help="With local: more peers, a JSON list of URLs, read again whenever it changes (the agent writes "
        "it from what the console says).",
    )
    peer_listen: str = setting(
        "",
        metavar="HOST:PORT",
        help="With local: where this host serves its cached blobs, by digest, to peers (signed with the peer "
        "secret); only that is served there. Empty: to nobody.",
    )
    peer_secret: str = setting(
        "",
        cli=False,
        help="With peer or peer_listen: the secret the hosts of one user sign their requests to each other "
        "with (the file or DAO_MIRROR_PEER_SECRET only).",
    )
    cache_min_free: str = setting("0", help="Free space to keep on the cache's disk, e.g. 10GiB; 0 = none.")
    gc_interval: float = setting(60.0, help="Seconds between checks of the cache limits.")
    upstream_username: str = setting("", help="Upstream account (raises Docker Hub's rate limit).")
    upstream_password: str = setting("", cli=False, help="Its password or token: file or environment only.")
    access_log: bool = setting(True, help="One log line per request.")
    log_level: str = setting("info", help="debug, info, warning or error.")
    log_format: str = setting(
        "text",
        help="text, or json: one object per line (time, client, user, method, path, status, bytes, "
        "cache, duration, user agent, registry).",
    )

    def __post_init__(self) -> None:
        check_url("upstream", self.upstream)
        parse_listen(self.listen)
        for name, url in self.registries.items():
            check_url(f"registry {name!r}: URL", url)
        if self.manifest_ttl < 0 or self.manifest_timeout <= 0 or self.manifest_swr < 0:
            raise ConfigError("manifest_ttl and manifest_swr must be >= 0, manifest_timeout > 0")
        if self.negative_ttl < 0 or self.breaker_cooldown < 0 or self.breaker_failures < 1:
            raise ConfigError("negative_ttl and breaker_cooldown must be >= 0, breaker_failures >= 1")
        if self.redis:
            if not self.redis.startswith(("redis://", "rediss://", "unix://")):
                raise ConfigError(f"redis must be a redis://, rediss:// or unix:// URL, got {self.redis!r}")
            if not self.node_url or not self.cluster_secret:
                raise ConfigError(
                    "redis needs node_url (--node-url: how the other nodes reach this one) and cluster_secret "
                    "(DAO_MIRROR_CLUSTER_SECRET or the file: the same on every node)"
                )
            check_url("node_url", self.node_url)
        if self.local:
            host = self.listen_address[0]
            if host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("127."):
                raise ConfigError(f"local listens on loopback only (it has no accounts), got {self.listen!r}")
            for url in (*self.via, *self.peer):
                check_url("via and peer", url)
            if (self.peer or self.peer_listen or self.peers_file) and len(self.peer_secret) < 16:
                raise ConfigError(
                    "peer, peers_file and peer_listen need peer_secret (DAO_MIRROR_PEER_SECRET or the file: the "
                    "same on every host of the user, at least 16 characters)"
                )
            if self.peer_listen:
                parse_listen(self.peer_listen)
        elif self.via or self.peer or self.peer_listen or self.peers_file:
            raise ConfigError("via, peer, peers_file and peer_listen are for the local accelerator (--local)")
        if self.lease_ttl <= 0:
            raise ConfigError("lease_ttl must be > 0")
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
    def cache_limit(self) -> str:
        """The local accelerator's cache is bounded even when nobody said how far."""
        return LOCAL_CACHE_MAX if self.local and self.cache_max in ("", "0") else self.cache_max

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_listen(self.listen)


@dataclass(frozen=True)
class PullConfig:
    """The ``[pull]`` table (no flags of its own: ``dao pull``'s options are per pull)."""

    mirrors: tuple[str, ...] = setting(
        (), cli=False, help="Mirrors to try after --mirror, before the engine's registry-mirrors."
    )

    def __post_init__(self) -> None:
        for url in self.mirrors:
            check_url("[pull] mirrors: each", url)


def check_url(what: str, url: str) -> None:
    split = urlsplit(url)
    if split.scheme not in ("http", "https") or not split.netloc or split.path not in ("", "/"):
        raise ConfigError(f"{what} must be http(s)://host[:port], got {url!r}")


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
