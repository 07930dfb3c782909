"""What is shared between users and repositories.

Every cached digest (blob or manifest) records each (registry, repository) it was fetched for or confirmed
in (:class:`~dao.mirror.storage.base.Origin`), and whether the mirror's own upstream credentials were used. A
hit through a repository not among them is served at once only when some origin is allowed by the mirror's
rules and was fetched without those credentials (public content); otherwise the upstream is asked first (a
HEAD in the requested repository, by the proxy) whether the digest belongs there, so a digest learned from a
private repository cannot be read through a public name, and a deny rule cannot be side-stepped.
"""

from __future__ import annotations

from collections.abc import Callable

from dao.mirror.storage.base import Origin, OriginStore
from dao.oci.digest import Digest


class Sharing:
    """One registry's view of the origin records (``origins`` None: nothing recorded, everything shared)."""

    def __init__(
        self,
        origins: OriginStore | None,
        allowed: Callable[[str, str], bool] | None,
        registry: str,
        *,
        credentialed: bool,
    ) -> None:
        self.origins = origins
        self.allowed = allowed or (lambda registry, repository: True)
        self.registry = registry
        self.credentialed = credentialed

    def origin(self, repo: str) -> Origin:
        return Origin(self.registry, repo, self.credentialed)

    async def record(self, digest: Digest, repo: str) -> None:
        """``digest`` belongs to ``repo``: the upstream answered for it there."""
        if self.origins is not None:
            await self.origins.add_origin(digest, self.origin(repo))

    async def must_confirm(self, repo: str, digest: Digest, also: Origin | None = None) -> bool:
        """Whether the upstream must confirm ``digest`` in ``repo`` before the cached copy is served there.
        ``also``: an origin not recorded yet (the one of a fetch still running)."""
        if self.origins is None:
            return False
        seen = set(await self.origins.origins(digest)) | ({also} if also is not None else set())
        if any(o.registry == self.registry and o.repository == repo for o in seen):
            return False
        allowed = [o for o in seen if self.allowed(o.registry, o.repository)]
        # public: the digest names the content, whoever asks through an allowed name
        return not (any(not o.credentialed for o in allowed) or (not seen and not self.credentialed))
