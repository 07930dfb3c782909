#!/usr/bin/env python3
"""Mirror nodes as a cluster (``--storage s3://`` + ``--redis``) next to one filesystem node, in the same run,
on the same emulated long-haul link and image.

Run from the repository root after ``make test`` has installed everything (root needed for the namespace):

    .venv/bin/python bench/cluster.py [--size-mib 48] [--nodes 3] [--clients 8] [--rtt-ms 160] [--link-mbit 40]

It re-runs itself in a private network namespace: the upstream (CNCF registry + token server) behind the
emulated link (``bench/link.py``), SeaweedFS (``weed mini``) and ``redis-server`` on loopback. Measured:

- cold: ``--clients`` skopeo pulls at once of a cold image, all on one filesystem node, then spread
  round-robin over ``--nodes`` cluster nodes: wall time, and upstream bytes as a multiple of the image;
- warm throughput (8 curl clients): one filesystem node's disk, a cluster node's disk, a node with an
  empty disk streaming from the bucket (its first read), and ``--redirect`` (curl follows to the bucket);
- per request (sequential, warm): p50/p99 of a manifest GET by tag and of a 1 MiB blob GET, one filesystem
  node against one cluster node;
- what a pull costs the shared parts: Redis calls and bucket requests per pull, cold and warm (from the
  nodes' ``/metrics``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.services import images  # noqa: E402
from tests.services.mirror import Mirror  # noqa: E402
from tests.services.procs import Stoppable, free_port, stopping  # noqa: E402
from tests.services.redis import Redis  # noqa: E402
from tests.services.seaweed import Seaweed  # noqa: E402

from bench.common import run_isolated  # noqa: E402
from bench.mirror_vs_distribution import REPO, curl_throughput, far_upstream, skopeo_pulls  # noqa: E402

MiB = 1024 * 1024
SECRET = "bench-cluster-secret"
ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=48, help="the big layer's size")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rtt-ms", type=float, default=160)
    parser.add_argument("--link-mbit", type=float, default=40, help="bottleneck shared by all connections")
    parser.add_argument("--conn-mbit", type=float, default=3, help="loss-limited ceiling per TCP connection; 0 = none")
    parser.add_argument("--warm-rounds", type=int, default=3)
    parser.add_argument("--warm-repeat", type=int, default=4, help="downloads per client per warm round")
    parser.add_argument("--requests", type=int, default=300, help="sequential requests per latency figure")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed for one pull phase")
    parser.add_argument("--workdir", type=Path, help="keep logs and data here (default: a temporary directory)")
    args = parser.parse_args()
    run_isolated(args, run, "dao-bench-cluster-")


def metric_sum(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(m[1]) for m in re.finditer(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


def costs(nodes: list[Mirror]) -> tuple[float, float]:
    """Redis calls and bucket requests so far, over all the nodes."""
    redis = sum(metric_sum(n.url, "dao_mirror_redis_calls_total") for n in nodes)
    bucket = sum(metric_sum(n.url, "dao_mirror_bucket_requests_total") for n in nodes)
    return redis, bucket


async def latencies(url: str, path: str, count: int, headers: dict[str, str]) -> tuple[float, float]:
    """p50 and p99 in ms of ``count`` sequential GETs on one kept-alive connection (after 20 to warm up)."""
    import aiohttp

    took = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        for i in range(count + 20):
            started = time.perf_counter()
            async with s.get(url + path, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url}{path}: {r.status}")
            if i >= 20:
                took.append((time.perf_counter() - started) * 1000)
    took.sort()
    return statistics.median(took), took[min(len(took) - 1, int(len(took) * 0.99))]


def run(args: argparse.Namespace, work: Path) -> None:
    size = args.size_mib * MiB
    print(f"building a {args.size_mib} MiB + 1 MiB image...", file=sys.stderr)
    image = images.image(work, [images.data_layer(work, "bench", size), images.data_layer(work, "small", MiB)])
    layers = sorted(image.layer_digests(), key=lambda d: image.blobs[d].stat().st_size)
    small, big = layers[0], layers[-1]
    image_size = sum(p.stat().st_size for p in image.blobs.values())
    with stopping() as started:
        measure(args, work, image, image_size, small, big, started)


def measure(
    args: argparse.Namespace,
    work: Path,
    image: images.Image,
    image_size: int,
    small: str,
    big: str,
    started: list[Stoppable],
) -> None:
    _, link, _, remote = far_upstream(args, work, image, started)
    weed = Seaweed(work / "weed")
    started.append(weed)
    redis = Redis(work / "redis")
    started.append(redis)
    out = work / "pulls"
    out.mkdir(exist_ok=True)
    n = args.clients

    def node(name: str, *extra: str) -> Mirror:
        port = free_port()
        env = {**os.environ, **weed.env, "DAO_MIRROR_CLUSTER_SECRET": SECRET}
        argv = ("--storage", f"s3://{weed.bucket}/bench", "--redis", redis.url, "--node-url",
                f"http://127.0.0.1:{port}", "--no-access-log", *extra)  # fmt: skip
        m = Mirror(work / name, remote, port=port, args=argv, env=env)
        started.append(m)
        return m

    print(f"[one filesystem node] cold, {n} clients...", file=sys.stderr)
    single = Mirror(work / "single", remote, args=("--no-access-log",))
    started.append(single)
    before = link.down_bytes
    single_s, single_ok = skopeo_pulls(single.port, out, n, args.timeout)
    single_up = (link.down_bytes - before) / image_size

    print(f"[{args.nodes} cluster nodes] cold, {n} clients spread over them...", file=sys.stderr)
    nodes = [node(f"node{i}") for i in range(args.nodes)]
    before = link.down_bytes
    redis0, bucket0 = costs(nodes)
    cluster_s, cluster_ok = skopeo_pulls([m.port for m in nodes], out, n, args.timeout)
    cluster_up = (link.down_bytes - before) / image_size
    redis1, bucket1 = costs(nodes)
    warm_s, warm_ok = skopeo_pulls([m.port for m in nodes], out, n, args.timeout)
    redis2, bucket2 = costs(nodes)

    print("warm throughput...", file=sys.stderr)
    big_size = image.blobs[big].stat().st_size
    path = f"/v2/{REPO}/blobs/{big}"
    rounds, repeat = args.warm_rounds, args.warm_repeat
    warm = {
        "filesystem node, its disk": curl_throughput(single.url + path, 8, big_size, rounds, repeat),
        "cluster node, its disk": curl_throughput(nodes[0].url + path, 8, big_size, rounds, repeat),
    }
    streamed = []
    for i in range(args.warm_rounds):  # a node with an empty disk: its first read comes from the bucket
        fresh = node(f"fresh{i}")
        streamed.append(curl_throughput(fresh.url + path, 8, big_size, 1, 1))
        fresh.stop()
    warm["empty node, from the bucket"] = statistics.median(streamed)
    redirector = node("redirect", "--redirect")
    warm["--redirect (curl follows)"] = curl_throughput(
        redirector.url + path, 8, big_size, args.warm_rounds, args.warm_repeat, follow=True
    )

    print("per-request cost...", file=sys.stderr)
    manifest = f"/v2/{REPO}/manifests/v1"
    blob = f"/v2/{REPO}/blobs/{small}"
    per = {
        name: (
            asyncio.run(latencies(m.url, manifest, args.requests, {"Accept": ACCEPT})),
            asyncio.run(latencies(m.url, blob, args.requests, {})),
        )
        for name, m in (("filesystem node", single), ("cluster node", nodes[0]))
    }

    print()
    print(
        f"link: {args.rtt_ms:g} ms RTT, {args.link_mbit:g} mbit shared, {args.conn_mbit:g} mbit per connection; "
        f"image {image_size / MiB:.1f} MiB; {n} clients; this machine: {os.cpu_count()} cores"
    )
    header = f"{'cold pull':<34} {'wall':>9} {'ok':>6} {'upstream bytes':>15}"
    print(header)
    print("-" * len(header))
    print(f"{'one filesystem node':<34} {f'{single_s:.1f} s':>9} {f'{single_ok}/{n}':>6} {f'{single_up:.2f}x':>15}")
    print(
        f"{f'{args.nodes} nodes (bucket + redis)':<34} {f'{cluster_s:.1f} s':>9} {f'{cluster_ok}/{n}':>6} "
        f"{f'{cluster_up:.2f}x':>15}"
    )
    print(f"cluster / one node: {cluster_s / single_s:.2f}x the wall time (target <= 1.1), upstream {cluster_up:.2f}x")
    print()
    header = f"{'warm, 8 clients':<34} {'MB/s':>9}"
    print(header)
    print("-" * len(header))
    for name, mbs in warm.items():
        print(f"{name:<34} {mbs:>9.0f}")
    print()
    header = f"{'per request (ms)':<20} {'manifest p50':>13} {'p99':>7} {'1 MiB blob p50':>15} {'p99':>7}"
    print(header)
    print("-" * len(header))
    for name, ((m50, m99), (b50, b99)) in per.items():
        print(f"{name:<20} {m50:>13.2f} {m99:>7.2f} {b50:>15.2f} {b99:>7.2f}")
    print()
    pulls = max(cluster_ok, 1)
    print(
        f"shared parts per pull (image of {len(image.blobs)} blobs): cold {(redis1 - redis0) / pulls:.1f} Redis calls, "
        f"{(bucket1 - bucket0) / pulls:.1f} bucket requests; warm ({warm_ok}/{n} ok, {warm_s:.1f} s) "
        f"{(redis2 - redis1) / max(warm_ok, 1):.1f} Redis calls, {(bucket2 - bucket1) / max(warm_ok, 1):.1f} "
        "bucket requests"
    )


if __name__ == "__main__":
    main()
