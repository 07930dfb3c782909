"""Where the mirror keeps what it has verified: blobs (content-addressed) and manifests.

``BlobStore`` is the union of small capabilities, so a backend (filesystem now, S3-compatible later) can be
tested capability by capability and the proxy depends only on what it uses.
"""

from dao.mirror.storage.base import BlobStore, LocalBlob, ManifestRecord, ManifestStore, Origin, OriginStore
from dao.mirror.storage.filesystem import FilesystemBlobStore, FilesystemManifestStore, FilesystemOrigins

__all__ = [
    "BlobStore",
    "FilesystemBlobStore",
    "FilesystemManifestStore",
    "FilesystemOrigins",
    "LocalBlob",
    "ManifestRecord",
    "ManifestStore",
    "Origin",
    "OriginStore",
]
