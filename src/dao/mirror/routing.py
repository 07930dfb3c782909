"""Which registry a request is for, and whether it may be served.

One mirror fronts many registries. A request names its registry in one of four ways, tried in this order:

1. the ``Host`` it was sent to, when that host is mapped to a registry (``ghcr.mirror.example`` -> ``ghcr.io``);
2. containerd's ``?ns=<registry>`` query, which its ``hosts.toml`` mirrors add to every request;
3. a path prefix: ``/v2/ghcr.io/org/app/...`` (a first component that looks like a domain, as docker decides
   it: a ``.`` or ``:`` in it, or ``localhost``) or a configured alias (``/v2/ghcr/org/app/...``);
4. otherwise Docker Hub (docker's ``registry-mirrors`` sends plain ``/v2/library/nginx/...``).

Only known registries are proxied -- the built-in public ones plus those configured -- so the mirror cannot be
turned into a proxy for arbitrary hosts (internal addresses included). ``allow``/``deny`` rules are globs on
``<registry>/<repository>``; deny wins, and when allow rules exist one of them must match.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import NamedTuple

from dao.mirror.errors import BadName, Denied, MirrorError, NotProxied
from dao.oci.reference import DOCKER_HUB_DOMAIN, DOCKER_HUB_NAMES, ReferenceError, normalize_repository

DOCKER_HUB_ALIASES = DOCKER_HUB_NAMES

# Public registries served out of the box (name -> upstream URL); Docker Hub's URL comes from the config.
PUBLIC_REGISTRIES = {
    "ghcr.io": "https://ghcr.io",
    "gcr.io": "https://gcr.io",
    "registry.k8s.io": "https://registry.k8s.io",
    "k8s.gcr.io": "https://k8s.gcr.io",
    "quay.io": "https://quay.io",
    "mcr.microsoft.com": "https://mcr.microsoft.com",
    "public.ecr.aws": "https://public.ecr.aws",
    "docker.elastic.co": "https://docker.elastic.co",
    "nvcr.io": "https://nvcr.io",
}


class Route(NamedTuple):
    registry: str  # canonical name: docker.io, ghcr.io, ...
    repository: str  # as the upstream knows it (library/ added for Docker Hub)


class Router:
    def __init__(
        self,
        *,
        docker_hub: str,
        registries: Mapping[str, str] | None = None,
        aliases: Mapping[str, str] | None = None,
        hosts: Mapping[str, str] | None = None,
        allow: tuple[str, ...] = (),
        deny: tuple[str, ...] = (),
    ) -> None:
        self.upstreams: dict[str, str] = {DOCKER_HUB_DOMAIN: docker_hub, **PUBLIC_REGISTRIES}
        for name, url in (registries or {}).items():
            self.upstreams[canonical(name)] = url
        self.aliases = {alias: canonical(name) for alias, name in (aliases or {}).items()}
        self.hosts = {host.lower(): canonical(name) for host, name in (hosts or {}).items()}
        for target in (*self.aliases.values(), *self.hosts.values()):
            if target not in self.upstreams:
                raise ValueError(f"{target!r} is not a known registry; add it to registries")
        self.allow = allow
        self.deny = deny

    def route(self, host: str | None, ns: str | None, name: str) -> Route:
        """Raises :class:`NotProxied` for registries we do not proxy, :class:`BadName`, :class:`Denied`."""
        registry = None
        if host is not None:
            registry = self.hosts.get(host.lower()) or self.hosts.get(host.lower().rsplit(":", 1)[0])
        if registry is None and ns:
            registry = canonical(ns)
            if registry not in self.upstreams:
                raise NotProxied(f"this mirror does not proxy {ns[:200]!r}")
        if registry is None:
            first, sep, remainder = name.partition("/")
            if sep and first in self.aliases:
                registry, name = self.aliases[first], remainder
            elif sep and (any(c in first for c in ".:") or first == "localhost"):
                registry = canonical(first)
                if registry not in self.upstreams:
                    raise NotProxied(f"this mirror does not proxy {first[:200]!r}")
                name = remainder
            else:
                registry = DOCKER_HUB_DOMAIN
        try:
            repository = normalize_repository(name, official_prefix=registry == DOCKER_HUB_DOMAIN)
        except ReferenceError as exc:
            raise BadName(str(exc)) from exc
        self.check_allowed(registry, repository)
        return Route(registry, repository)

    def allows(self, registry: str, repository: str) -> bool:
        try:
            self.check_allowed(registry, repository)
        except MirrorError:
            return False
        return True

    def check_allowed(self, registry: str, repository: str) -> None:
        subject = f"{registry}/{repository}"
        for rule in self.deny:
            if fnmatch.fnmatchcase(subject, rule):
                raise Denied(f"{subject} is denied by the mirror's rule {rule!r}")
        if self.allow and not any(fnmatch.fnmatchcase(subject, rule) for rule in self.allow):
            raise Denied(f"{subject} matches none of the mirror's allow rules ({', '.join(self.allow)})")

    def upstream(self, registry: str) -> str:
        return self.upstreams[registry]


def canonical(name: str) -> str:
    name = name.lower()
    return DOCKER_HUB_DOMAIN if name in DOCKER_HUB_ALIASES else name
