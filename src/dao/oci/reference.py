"""Image references, parsed and normalised exactly as docker does (distribution/reference, normalize.go).

``ubuntu`` -> ``docker.io/library/ubuntu:latest``; ``localhost:5000/x`` keeps its domain; a first path component
is a domain when it holds a ``.`` or ``:``, is ``localhost``, or has an uppercase letter. Every failure raises
:class:`ReferenceError` with docker's own reason, so users see the message they already know.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from dao.errors import DaoError
from dao.oci.digest import Digest, DigestError

DOCKER_HUB_DOMAIN = "docker.io"
LEGACY_DOCKER_HUB_DOMAIN = "index.docker.io"
DOCKER_HUB_REGISTRY_HOST = "registry-1.docker.io"
DOCKER_HUB_NAMES = frozenset({DOCKER_HUB_DOMAIN, LEGACY_DOCKER_HUB_DOMAIN, DOCKER_HUB_REGISTRY_HOST})  # one registry
DOCKER_HUB_URL = f"https://{DOCKER_HUB_REGISTRY_HOST}"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
REMOTE_NAME = rf"{PATH_COMPONENT}(?:/{PATH_COMPONENT})*"
_NAME = rf"(?:{_DOMAIN}/)?{REMOTE_NAME}"

_REFERENCE_RE = re.compile(rf"({_NAME})(?::({TAG}))?(?:@({_DIGEST}))?", re.ASCII)
_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}")
_REMOTE_NAME_RE = re.compile(REMOTE_NAME)
_TAG_RE = re.compile(TAG, re.ASCII)


class ReferenceError(DaoError, ValueError):
    """A reference docker would refuse; the message is docker's own wording."""


@dataclass(frozen=True, slots=True)
class Reference:
    domain: str
    path: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str, *, default_tag: bool = True) -> Reference:
        """Normalise like ``docker pull``: Docker Hub defaults, and ``latest`` when neither tag nor digest."""
        if _IDENTIFIER_RE.fullmatch(text):
            raise ReferenceError(f"invalid repository name ({text}), cannot specify 64-byte hexadecimal strings")
        domain, remainder = split_docker_domain(text)
        remote = remainder.partition(":")[0]
        if remote.lower() != remote:
            raise ReferenceError(f"invalid reference format: repository name ({remote}) must be lowercase")
        full = f"{domain}/{remainder}"
        match = _REFERENCE_RE.fullmatch(full)
        if match is None:
            if not text:
                raise ReferenceError("invalid reference format: repository name must have at least one component")
            if _REFERENCE_RE.fullmatch(full.lower()):
                raise ReferenceError("invalid reference format: repository name must be lowercase")
            raise ReferenceError("invalid reference format")
        name, tag, digest_text = match.groups()
        if len(name) > NAME_TOTAL_LENGTH_MAX:
            raise ReferenceError(f"repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters")
        digest = None
        if digest_text is not None:
            try:
                digest = Digest.parse(digest_text)
            except DigestError as exc:
                raise ReferenceError(f"invalid reference format: {exc}") from exc
        if default_tag and tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(domain, name[len(domain) + 1 :], tag, digest)

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}"

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when there is one (it pins), else the tag."""
        return str(self.digest) if self.digest else (self.tag or DEFAULT_TAG)

    @property
    def registry_host(self) -> str:
        return DOCKER_HUB_REGISTRY_HOST if self.domain == DOCKER_HUB_DOMAIN else self.domain

    def familiar(self) -> str:
        """The short form docker prints (``ubuntu:22.04``, ``user/app``, ``ghcr.io/o/a:1``)."""
        if self.domain == DOCKER_HUB_DOMAIN:
            return self.path.removeprefix(OFFICIAL_REPO_PREFIX) + self._suffix()
        return f"{self.domain}/{self.path}" + self._suffix()

    def with_digest(self, digest: Digest) -> Reference:
        return replace(self, digest=digest)

    def _suffix(self) -> str:
        out = f":{self.tag}" if self.tag else ""
        return out + (f"@{self.digest}" if self.digest else "")

    def __str__(self) -> str:
        return self.name + self._suffix()


def split_docker_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if not sep or (not any(c in first for c in ".:") and first != "localhost" and first.lower() == first):
        domain, remainder = DOCKER_HUB_DOMAIN, name
    else:
        domain, remainder = first, rest
    if domain == LEGACY_DOCKER_HUB_DOMAIN:
        domain = DOCKER_HUB_DOMAIN
    if domain == DOCKER_HUB_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder


def normalize_repository(name: str, *, official_prefix: bool = True) -> str:
    """A repository path as it appears in ``/v2/<name>/...``, validated; ``ubuntu`` -> ``library/ubuntu``.

    Raises :class:`ReferenceError` for anything outside the grammar (``..``, empty components, uppercase).
    """
    if not name or len(name) > NAME_TOTAL_LENGTH_MAX or not _REMOTE_NAME_RE.fullmatch(name):
        raise ReferenceError(f"invalid repository name: {name[:300]!r}")
    if official_prefix and "/" not in name:
        name = OFFICIAL_REPO_PREFIX + name
    return name


def is_valid_tag(tag: str) -> bool:
    return _TAG_RE.fullmatch(tag) is not None
