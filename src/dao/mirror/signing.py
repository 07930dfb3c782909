"""The signatures one dao puts on its requests to another: a node of a cluster to another node (the cluster
secret), a host's local accelerator to a peer's (the user's peer secret). Each signs the blob's digest with
what the request is for, so a signature made for one purpose is worth nothing for the other."""

from __future__ import annotations

import hashlib
import hmac

from dao.oci.digest import Digest


class Signer:
    def __init__(self, secret: str, purpose: str) -> None:
        self._secret, self._purpose = secret.encode(), purpose

    def sign(self, digest: Digest) -> str:
        return hmac.new(self._secret, f"{self._purpose} {digest}".encode(), hashlib.sha256).hexdigest()

    def signed(self, digest: Digest, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(self.sign(digest), value)
