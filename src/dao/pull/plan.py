"""From a reference to the list of blobs to get: the manifest (through the first source that answers), the
platform's image manifest when the tag names an index, its config and layers."""

from __future__ import annotations

import json
from dataclasses import dataclass

from dao.errors import DaoError
from dao.oci.digest import Digest
from dao.oci.manifest import DEFAULT_ACCEPT, INDEX_TYPES, Descriptor, Platform, descriptors
from dao.oci.reference import Reference
from dao.registry.client import Manifest, RegistryClient
from dao.registry.errors import RegistryClientError, UpstreamNotFound


class PullError(DaoError):
    """Why the pull cannot go on; one line for the user."""


@dataclass(frozen=True, slots=True)
class Source:
    url: str
    client: RegistryClient
    mirror: bool


@dataclass(frozen=True, slots=True)
class Plan:
    ref: Reference
    digest: Digest  # what the reference resolved to (the index's digest for a multi-platform image)
    manifest: Manifest  # the image manifest for our platform
    config: Descriptor
    layers: list[Descriptor]
    source: Source  # the one that answered


async def resolve(ref: Reference, sources: list[Source], platform: Platform) -> Plan:
    errors: list[str] = []
    for source in sources:
        try:
            top = await source.client.get_manifest(ref.path, ref.reference, DEFAULT_ACCEPT)
            manifest = top
            if top.media_type in INDEX_TYPES:
                child = choose(descriptors(top.body), platform)
                if child is None:
                    raise PullError(f"no matching manifest for {platform} in the manifest list entries")
                manifest = await source.client.get_manifest(ref.path, str(child.digest), (child.media_type,))
            parts = descriptors(manifest.body)
            doc = json.loads(manifest.body)
        except UpstreamNotFound as exc:
            if not source.mirror:
                raise PullError(f"manifest for {ref.familiar()} not found: manifest unknown") from exc
            errors.append(f"{source.url}: not found")
            continue
        except (RegistryClientError, ValueError, KeyError) as exc:
            errors.append(f"{source.url}: {exc}")
            continue
        if not isinstance(doc.get("config"), dict):
            raise PullError(f"{ref.familiar()}: manifest has no config (schema 1 images are not supported)")
        return Plan(ref, top.digest, manifest, parts[0], parts[1:], source)
    raise PullError(f"cannot get the manifest of {ref.familiar()}: " + "; ".join(errors))


def choose(entries: list[Descriptor], platform: Platform) -> Descriptor | None:
    """The entry for ``platform``, as docker picks it: same os and architecture, variant if given."""
    fitting = [
        d
        for d in entries
        if d.platform is not None and d.platform.os == platform.os and d.platform.architecture == platform.architecture
    ]
    if platform.variant:
        exact = [d for d in fitting if d.platform is not None and d.platform.variant == platform.variant]
        return exact[0] if exact else None
    return fitting[0] if fitting else None
