"""Content digests (``algorithm:encoded``) and a streaming verifier.

Only algorithms we can verify are accepted: a digest we cannot check is as bad as no digest, so ``sha256``,
``sha384`` and ``sha512`` parse (the ones go-digest registers); anything else raises :class:`DigestError`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

# Grammar from the OCI image spec (descriptor.md): algorithm-component(separator algorithm-component)*
_ALGORITHM = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*")
_ENCODED = re.compile(r"[a-zA-Z0-9=_-]+")
_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}
_LOWER_HEX = re.compile(r"[a-f0-9]+")


class DigestError(ValueError):
    """A string is not a digest we accept; ``unsupported`` tells a well-formed but unknown algorithm apart."""

    def __init__(self, message: str, *, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    encoded: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        algorithm, sep, encoded = text.partition(":")
        if not sep or not _ALGORITHM.fullmatch(algorithm) or not _ENCODED.fullmatch(encoded):
            raise DigestError(f"invalid digest format: {text[:200]!r}")
        length = _HEX_LENGTH.get(algorithm)
        if length is None:
            raise DigestError(f"unsupported digest algorithm: {algorithm[:50]!r}", unsupported=True)
        if len(encoded) != length or not _LOWER_HEX.fullmatch(encoded):
            raise DigestError(f"invalid {algorithm} digest: expected {length} lowercase hex characters")
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"


class Verifier:
    """Hashes a stream as it passes; ``verified`` is only meaningful once the last byte went through."""

    def __init__(self, expected: Digest) -> None:
        self.expected = expected
        self._hash = expected.hasher()
        self.size = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)

    def actual(self) -> Digest:
        return Digest(self.expected.algorithm, self._hash.hexdigest())

    @property
    def verified(self) -> bool:
        return self.actual() == self.expected
