"""Manifest media types, ``Accept`` negotiation and what a manifest references.

The mirror must never hand a client a manifest type it did not ask for: a client that accepts only Docker
schema2 would choke on an OCI index. :func:`accept_key` gives every distinct set of accepted types one
stable key, so cached tag manifests are kept apart per set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dao.oci.digest import Digest, DigestError

DOCKER_MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
IMAGE_MANIFEST_TYPES = frozenset({DOCKER_MANIFEST_V2, OCI_MANIFEST})
MANIFEST_TYPES = INDEX_TYPES | IMAGE_MANIFEST_TYPES | {DOCKER_MANIFEST_V1_SIGNED, DOCKER_MANIFEST_V1}

# What a modern client sends (docker 20.10+, containerd): used when we must choose for it.
DEFAULT_ACCEPT = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST_V2)

MAX_MANIFEST_SIZE = 4 * 1024 * 1024  # the distribution spec's recommended lower bound for registries to accept


ACCEPT_WILDCARDS = frozenset({"*/*", "application/*"})


def parse_accept(values: Iterable[str]) -> tuple[str, ...]:
    """The manifest types in one or more ``Accept`` headers: parameters dropped, lower-cased, de-duplicated,
    sorted. Anything else is dropped: the result becomes a cache key, and a client must not be able to make
    one key per made-up type (nor a key per spelling of the same set)."""
    types: set[str] = set()
    for value in values:
        for part in value.split(","):
            media_type = part.split(";", 1)[0].strip().lower()
            if media_type in MANIFEST_TYPES or media_type in ACCEPT_WILDCARDS:
                types.add(media_type)
    return tuple(sorted(types))


def accept_key(accepted: tuple[str, ...]) -> str:
    """A short stable file-name-safe key for a set of accepted media types."""
    return hashlib.sha256("\n".join(accepted).encode()).hexdigest()[:16]


def acceptable(media_type: str, accepted: tuple[str, ...]) -> bool:
    """Whether a client that sent ``accepted`` may be given ``media_type``.

    No ``Accept`` at all, or a wildcard, accepts anything; registries then answer with what they have.
    """
    if not accepted or "*/*" in accepted or "application/*" in accepted:
        return True
    return media_type in accepted


def media_type_of(body: bytes, content_type: str | None) -> str:
    """The manifest's media type: the ``mediaType`` field when present (it is what the digest covers).

    Always one of :data:`MANIFEST_TYPES`: it becomes the ``Content-Type`` the mirror answers with, and an
    upstream's ``text/html`` must not reach a browser as such.
    """
    declared = (content_type or "").split(";", 1)[0].strip().lower()
    declared = declared if declared in MANIFEST_TYPES else ""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return declared or DOCKER_MANIFEST_V1_SIGNED
    if isinstance(doc, dict):
        field = doc.get("mediaType")
        if isinstance(field, str) and field in MANIFEST_TYPES:
            return field
        if declared:
            return declared
        if doc.get("schemaVersion") == 1:
            return DOCKER_MANIFEST_V1_SIGNED if "signatures" in doc else DOCKER_MANIFEST_V1
        if "manifests" in doc:
            return OCI_INDEX
        if "config" in doc:
            return OCI_MANIFEST
    return declared or OCI_MANIFEST


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def from_json(cls, doc: Any) -> Platform | None:
        if not isinstance(doc, dict):
            return None
        os_, arch = doc.get("os"), doc.get("architecture")
        if not isinstance(os_, str) or not isinstance(arch, str):
            return None
        variant = doc.get("variant")
        return cls(os_, arch, variant if isinstance(variant, str) and variant else None)

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None


def descriptors(body: bytes) -> list[Descriptor]:
    """Everything a manifest points at: children of an index, or config + layers of an image manifest.

    Raises ``ValueError`` when the body is not a manifest we understand.
    """
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise ValueError("manifest is not a JSON object")
    if isinstance(doc.get("manifests"), list):
        entries = doc["manifests"]
    else:
        entries = [doc["config"]] if isinstance(doc.get("config"), dict) else []
        entries += doc.get("layers") or []
    out = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError("descriptor is not a JSON object")
        try:
            digest = Digest.parse(str(entry.get("digest", "")))
        except DigestError as exc:
            raise ValueError(str(exc)) from exc
        size = entry.get("size")
        if not isinstance(size, int) or size < 0:
            raise ValueError("descriptor size is not a non-negative integer")
        out.append(Descriptor(str(entry.get("mediaType", "")), digest, size, Platform.from_json(entry.get("platform"))))
    return out
