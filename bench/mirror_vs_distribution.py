#!/usr/bin/env python3
"""dao's mirror next to the CNCF registry's proxy mode, on the same emulated long-haul link and image.

Run from the repository root after ``make test`` has installed everything (root needed for the namespace):

    .venv/bin/python bench/mirror_vs_distribution.py [--size-mib 48] [--rtt-ms 160] [--link-mbit 40] [--conn-mbit 3]

The script re-runs itself in a private network namespace (``tests/services/isolated.sh``): every byte stays
on that namespace's loopback. In it: the upstream (CNCF registry + token server, seeded with one single-layer
image of ``--size-mib`` random bytes), the emulated link in front of both (see ``bench/link.py``), and each
mirror in turn with an empty cache. Clients are real: ``skopeo copy`` for pulls, ``curl`` for raw blob
throughput; the local ceiling is nginx (``sendfile on``; ``apt install nginx-light``) serving the same file,
or ``bench/sendfile_server.py`` where nginx is not installed.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.services import images  # noqa: E402
from tests.services.mirror import Mirror  # noqa: E402
from tests.services.procs import Process, Stoppable, free_port, http_status, stopping, wait_until  # noqa: E402
from tests.services.upstream import Upstream  # noqa: E402

from bench.common import LinkThread, run_isolated  # noqa: E402
from bench.link import Link  # noqa: E402

REPO = "library/benchbig"
MiB = 1024 * 1024


@dataclass
class Result:
    name: str
    cold1_s: float = float("nan")
    cold1_ok: bool = False
    cold8_s: float = float("nan")
    cold8_ok: int = 0
    cold8_upstream: float = float("nan")  # multiples of the blob size
    warm_mbs: float = float("nan")
    rss_mib: float = 0.0
    offline_ok: int = 0
    offline_of: int = 0
    offline_s: float = 0.0  # the slowest offline pull
    notes: list[str] = field(default_factory=list)


class ReferenceMirror:
    """``docker-registry`` in proxy mode (pull-through cache) in front of ``upstream``."""

    def __init__(self, workdir: Path, upstream: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "proxy.yml"
        config.write_text(
            json.dumps(
                {
                    "version": 0.1,
                    "log": {"level": "info", "accesslog": {"disabled": False}},
                    "storage": {"filesystem": {"rootdirectory": str(workdir / "storage")}},
                    "http": {"addr": f"127.0.0.1:{self.port}"},
                    "proxy": {"remoteurl": upstream},
                }
            )
        )
        self.proc = Process(["docker-registry", "serve", str(config)], workdir / "registry.log")
        wait_until(lambda: http_status(self.url + "/v2/") == 200, 60, "docker-registry proxy", self.proc.proc)

    def stop(self) -> None:
        self.proc.stop()


def peak_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def skopeo_pulls(port: int | list[int], out: Path, count: int, timeout: float) -> tuple[float, int]:
    """``count`` concurrent ``skopeo copy`` of the image (spread over the ports, round-robin, when given
    several); wall time and how many succeeded."""
    ports = [port] if isinstance(port, int) else port
    procs = []
    started = time.monotonic()
    for i in range(count):
        dest = out / f"pull-{i}"
        shutil.rmtree(dest, ignore_errors=True)
        procs.append(
            subprocess.Popen(
                [
                    "skopeo",
                    "copy",
                    "--retry-times",
                    "0",
                    "--src-tls-verify=false",
                    f"docker://127.0.0.1:{ports[i % len(ports)]}/{REPO}:v1",
                    f"dir:{dest}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    ok = 0
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            continue
        if p.returncode == 0:
            ok += 1
        else:
            last = err.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
            print(f"    skopeo failed: {last[0][:200]}", file=sys.stderr)
    elapsed = time.monotonic() - started
    for i in range(count):
        shutil.rmtree(out / f"pull-{i}", ignore_errors=True)
    return elapsed, ok


def curl_throughput(url: str, clients: int, size: int, rounds: int, repeat: int, follow: bool = False) -> float:
    """MB/s (10^6) for ``clients`` concurrent ``curl``s, each fetching ``url`` ``repeat`` times on one kept-alive
    connection (so a round lasts long enough to measure); the median of ``rounds``. ``follow``: redirects."""
    speeds = []
    argv = ["curl", "-sf", *(["-L"] if follow else []), "-w", "%{size_download}\n"]
    for _ in range(repeat):
        argv += ["-o", "/dev/null", url]
    for _ in range(rounds):
        started = time.monotonic()
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE) for _ in range(clients)]
        outputs = [p.communicate(timeout=600)[0].split() for p in procs]
        elapsed = time.monotonic() - started
        if any([int(x) for x in out] != [size] * repeat for out in outputs):
            raise RuntimeError(f"{url}: short downloads")
        speeds.append(clients * repeat * size / elapsed / 1e6)
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=48, help="the big layer's size")
    parser.add_argument("--rtt-ms", type=float, default=160)
    parser.add_argument("--link-mbit", type=float, default=40, help="bottleneck shared by all connections")
    parser.add_argument("--conn-mbit", type=float, default=3, help="loss-limited ceiling per TCP connection; 0 = none")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warm-rounds", type=int, default=5)
    parser.add_argument("--warm-repeat", type=int, default=8, help="downloads per client per warm round")
    parser.add_argument("--offline-pulls", type=int, default=3)
    parser.add_argument(
        "--cut",
        choices=["blackhole", "reset"],
        default="blackhole",
        help="how the upstream is cut off after warming: packets dropped (default) or connections refused",
    )
    parser.add_argument("--offline-timeout", type=float, default=60, help="seconds one offline pull may take")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed for one pull phase")
    parser.add_argument("--only", choices=["dao", "registry"], help="run one mirror only")
    parser.add_argument("--dao-args", default="", help="extra flags for dao mirror serve")
    parser.add_argument("--workdir", type=Path, help="keep logs and caches here (default: a temporary directory)")
    args = parser.parse_args()
    run_isolated(args, run, "dao-bench-")


def run(args: argparse.Namespace, work: Path) -> None:
    size = args.size_mib * MiB
    print(f"building a {args.size_mib} MiB single-layer image...", file=sys.stderr)
    image = images.image(work, [images.data_layer(work, "benchbig", size)])
    layer = max(image.layer_digests(), key=lambda d: image.blobs[d].stat().st_size)
    blob_size = image.blobs[layer].stat().st_size

    with stopping() as started:  # an interrupted run leaves nothing behind
        measure(args, work, image, layer, blob_size, started)


def far_upstream(
    args: argparse.Namespace, work: Path, image: images.Image, started: list[Stoppable]
) -> tuple[LinkThread, Link, Link, str]:
    """The upstream (registry + token server, with ``image`` as ``REPO:v1``) behind the emulated link of
    ``args`` (``rtt_ms``, ``link_mbit``, ``conn_mbit``): the link's thread, the registry's and the token
    server's links, and the URL the mirrors use."""
    links = LinkThread()
    link_port, token_port = free_port(), free_port()
    upstream = Upstream(work / "upstream", realm=f"http://127.0.0.1:{token_port}/token")
    started.append(upstream)
    upstream.push(REPO, "v1", image)
    delay = args.rtt_ms / 2000
    link = Link(("127.0.0.1", upstream.port), delay=delay, link_bps=args.link_mbit * 1e6, conn_bps=args.conn_mbit * 1e6)
    token_link = Link(("127.0.0.1", upstream.token_port), delay=delay, link_bps=0, conn_bps=0)
    links.start(link, link_port)
    links.start(token_link, token_port)
    return links, link, token_link, f"http://127.0.0.1:{link_port}"


def measure(
    args: argparse.Namespace, work: Path, image: images.Image, layer: str, blob_size: int, started: list[Stoppable]
) -> None:
    links, link, token_link, remote = far_upstream(args, work, image, started)

    def start_dao(d: Path) -> tuple[Stoppable, int, int]:
        m = Mirror(d, remote, args=tuple(args.dao_args.split()))
        started.append(m)
        assert m.proc is not None
        return m, m.port, m.proc.pid

    def start_reference(d: Path) -> tuple[Stoppable, int, int]:
        r = ReferenceMirror(d, remote)
        started.append(r)
        return r, r.port, r.proc.pid

    results = []
    contenders = [("dao", start_dao), ("registry", start_reference)]
    for name, start in contenders:
        if args.only and name != args.only:
            continue
        r = Result(name)
        results.append(r)
        out = work / "pulls"
        out.mkdir(exist_ok=True)

        print(f"[{name}] cold pull, 1 client...", file=sys.stderr)
        mirror, port, pid = start(work / f"{name}-cold1")
        r.cold1_s, ok = skopeo_pulls(port, out, 1, args.timeout)
        r.cold1_ok = ok == 1
        r.rss_mib = max(r.rss_mib, peak_rss_mib(pid))
        mirror.stop()

        print(f"[{name}] cold pull, {args.clients} clients...", file=sys.stderr)
        mirror, port, pid = start(work / f"{name}-cold8")
        before = link.down_bytes
        r.cold8_s, r.cold8_ok = skopeo_pulls(port, out, args.clients, args.timeout)
        r.cold8_upstream = (link.down_bytes - before) / blob_size

        print(f"[{name}] warm throughput, {args.clients} clients...", file=sys.stderr)
        url = f"http://127.0.0.1:{port}/v2/{REPO}/blobs/{layer}"
        r.warm_mbs = curl_throughput(url, args.clients, blob_size, args.warm_rounds, args.warm_repeat)

        print(f"[{name}] upstream cut off, {args.offline_pulls} pulls...", file=sys.stderr)
        links.call(functools.partial(link.cut, args.cut == "blackhole"))
        links.call(functools.partial(token_link.cut, args.cut == "blackhole"))
        time.sleep(0.2)
        for _ in range(args.offline_pulls):
            took, ok = skopeo_pulls(port, out, 1, args.offline_timeout)
            r.offline_ok += ok
            r.offline_of += 1
            r.offline_s = max(r.offline_s, took)
        r.rss_mib = max(r.rss_mib, peak_rss_mib(pid))
        mirror.stop()
        link.up = token_link.up = True

    ceiling_name, ceiling_mbs = local_ceiling(work, image.blobs[layer], args)
    report(args, blob_size, results, ceiling_name, ceiling_mbs)


def local_ceiling(work: Path, blob: Path, args: argparse.Namespace) -> tuple[str, float]:
    """What this machine can serve the same file at: nginx (sendfile on) if installed, else a threaded
    ``os.sendfile`` server."""
    port = free_port()
    root = work / "ceiling"
    root.mkdir(exist_ok=True)
    shutil.copyfile(blob, root / "blob")
    if shutil.which("nginx"):
        name = "nginx"
        conf = root / "nginx.conf"
        conf.write_text(
            f"user root; daemon off; worker_processes auto; pid {root}/nginx.pid; error_log {root}/error.log;\n"
            "events { worker_connections 1024; }\n"
            f"http {{ access_log off; sendfile on; tcp_nopush on; client_body_temp_path {root}/body;\n"
            f"  proxy_temp_path {root}/proxy; fastcgi_temp_path {root}/fcgi; uwsgi_temp_path {root}/uwsgi;\n"
            f"  scgi_temp_path {root}/scgi;\n"
            f"  server {{ listen 127.0.0.1:{port}; location / {{ root {root}; }} }} }}\n"
        )
        argv = ["nginx", "-p", str(root), "-c", str(conf)]
    else:
        name = "sendfile"
        argv = [sys.executable, str(ROOT / "bench" / "sendfile_server.py"), "--port", str(port), str(root / "blob")]
    server = Process(argv, root / "server.log")
    try:
        wait_until(lambda: http_status(f"http://127.0.0.1:{port}/blob") == 200, 10, name, server.proc)
        url = f"http://127.0.0.1:{port}/blob"
        return name, curl_throughput(url, args.clients, blob.stat().st_size, args.warm_rounds, args.warm_repeat)
    finally:
        server.stop()


def report(
    args: argparse.Namespace, blob_size: int, results: list[Result], ceiling_name: str, ceiling_mbs: float
) -> None:
    n = args.clients
    print()
    print(
        f"link: {args.rtt_ms:g} ms RTT, {args.link_mbit:g} mbit shared, "
        f"{args.conn_mbit:g} mbit per connection ({'none' if not args.conn_mbit else 'loss-limited TCP'}); "
        f"blob {blob_size / MiB:.1f} MiB; upstream cut by {args.cut}"
    )
    header = (
        f"{'mirror':<10} {'cold 1 client':>14} {f'cold {n} clients':>16} {'upstream bytes':>15} "
        f"{f'warm {n} clients':>16} {'peak RSS':>9} {'upstream cut':>22}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        cold1 = f"{r.cold1_s:.1f} s" + ("" if r.cold1_ok else " FAIL")
        cold8 = f"{r.cold8_s:.1f} s" + ("" if r.cold8_ok == n else f" {r.cold8_ok}/{n} ok")
        print(
            f"{r.name:<10} {cold1:>14} {cold8:>16} {f'{r.cold8_upstream:.2f}x':>15} "
            f"{f'{r.warm_mbs:.0f} MB/s':>16} {f'{r.rss_mib:.0f} MiB':>9} "
            f"{f'{r.offline_ok}/{r.offline_of} ok, max {r.offline_s:.1f} s':>22}"
        )
    print(f"{ceiling_name:<10} {'':>14} {'':>16} {'':>15} {f'{ceiling_mbs:.0f} MB/s':>16}   (local ceiling)")
    by = {r.name: r for r in results}
    if "dao" in by:
        d = by["dao"]
        print()
        if "registry" in by:
            print(
                f"cold 1 client: dao {by['registry'].cold1_s / d.cold1_s:.1f}x faster than the registry (target >= 3)"
            )
        print(
            f"cold {n} clients: {d.cold8_upstream:.2f}x the blob upstream (target 1.0), "
            f"{d.cold8_s / d.cold1_s:.2f}x the 1-client time (target <= 1.2)"
        )
        print(
            f"warm: {d.warm_mbs / ceiling_mbs:.2f}x the {ceiling_name} ceiling (target >= 0.9); "
            f"peak RSS {d.rss_mib:.0f} MiB (target < 150)"
        )


if __name__ == "__main__":
    main()
