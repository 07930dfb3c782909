#!/usr/bin/env python3
"""``dao pull`` and the local accelerator next to ``docker pull`` and ``skopeo copy ... docker-daemon:``, in
the same run.

    .venv/bin/python bench/pull_vs_docker.py [--size-mib 400] [--layers 25] [--layer-mib 4] [--rtt-ms 160] ...

Re-runs itself in a private network namespace. In it: the upstream (CNCF registry + token server) behind the
emulated long-haul link of ``bench/link.py``, two dao mirrors in front of that link, and a private dockerd
whose ``registry-mirrors`` lists both. Two images: one big single layer, one of many small layers. Each tool
pulls each image (a) straight from the upstream over the lossy link, (b) from the warm mirrors over an emulated
fast link (a mirror in the same region: short RTT, wide, but still a per-connection ceiling), (l) from the
warm mirrors on loopback (no link at all: what is left is each tool's own overhead and the engine's unpacking),
(c) from the warm mirrors (fast link) with the first one killed a moment into the pull. The engine and
dao's content cache are emptied before every measured pull.

The tools: ``docker`` (plain docker pull, the engine's mirrors the two mirrors), ``skopeo``, ``dao`` (dao pull's
load path, ``--load``), ``local`` (plain docker pull, the engine's only mirror a local accelerator whose
``--via`` are the two mirrors; in (a) it has none and reads the upstream over the lossy link) and
``dao-local`` (dao pull through that local accelerator: the engine's own pull). The local accelerator starts
empty for every measured pull. After the run, the ``RepoDigests`` each path left are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.services import images  # noqa: E402
from tests.services.dockerd import Dockerd  # noqa: E402
from tests.services.mirror import DAO, Mirror  # noqa: E402
from tests.services.procs import Stoppable, free_port, stopping  # noqa: E402
from tests.services.upstream import Upstream  # noqa: E402

from bench.common import LinkThread, run_isolated  # noqa: E402
from bench.link import Link  # noqa: E402

MiB = 1024 * 1024
TOOLS = ("docker", "skopeo", "dao", "local", "dao-local")
LOCAL_TOOLS = ("local", "dao-local")


@dataclass
class Run:
    tool: str
    image: str
    scenario: str
    seconds: float
    ok: bool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=400, help="the single-layer image's layer")
    parser.add_argument("--layers", type=int, default=25, help="layers of the many-layer image")
    parser.add_argument("--layer-mib", type=float, default=4, help="size of each of those layers")
    parser.add_argument("--rtt-ms", type=float, default=160)
    parser.add_argument("--link-mbit", type=float, default=40)
    parser.add_argument("--conn-mbit", type=float, default=3)
    parser.add_argument("--fast-rtt-ms", type=float, default=20, help="(b, c): the link to the mirrors")
    parser.add_argument("--fast-link-mbit", type=float, default=1000)
    parser.add_argument("--fast-conn-mbit", type=float, default=100)
    parser.add_argument("--kill-after", type=float, default=1.0, help="seconds into a pull to kill mirror 1 in (c)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed for one pull")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ",".join(TOOLS))
    parser.add_argument("--images", default="big,many", help="comma-separated subset of big,many")
    parser.add_argument("--scenarios", default="a,b,l,c", help="comma-separated subset of a,b,l,c")
    parser.add_argument("--repeat", type=int, default=3, help="(b) pulls per tool; the median is reported")
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temporary directory)")
    args = parser.parse_args()
    run_isolated(args, run, "dao-pullbench-")


def run(args: argparse.Namespace, work: Path) -> None:
    # dao's bytecode, as an installed wheel has it: an editable checkout under PYTHONDONTWRITEBYTECODE would
    # compile every module it imports on every pull (~30 ms of dao pull's start)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "src")], check=True, capture_output=True)
    print("building images...", file=sys.stderr)
    big = images.image(work, [images.data_layer(work, "pb-big", args.size_mib * MiB)])
    many = images.image(
        work, [images.data_layer(work, f"pb-{i}", int(args.layer_mib * MiB)) for i in range(args.layers)]
    )
    chosen = args.images.split(",")
    with stopping() as started:
        measure(args, work, {k: v for k, v in {"big": big, "many": many}.items() if k in chosen}, started)


def measure(args: argparse.Namespace, work: Path, built: dict, started: list[Stoppable]) -> None:
    links = LinkThread()
    link_port, token_port = free_port(), free_port()
    upstream = Upstream(work / "upstream", realm=f"http://127.0.0.1:{token_port}/token")
    started.append(upstream)
    for name, image in built.items():
        upstream.push(f"library/pb-{name}", "v1", image)
    delay = args.rtt_ms / 2000
    link = Link(("127.0.0.1", upstream.port), delay=delay, link_bps=args.link_mbit * 1e6, conn_bps=args.conn_mbit * 1e6)
    links.start(link, link_port)
    links.start(Link(("127.0.0.1", upstream.token_port), delay=delay, link_bps=0, conn_bps=0), token_port)
    remote = f"http://127.0.0.1:{link_port}"
    mirrors = [Mirror(work / f"mirror{i}", remote) for i in (1, 2)]
    started.extend(mirrors)
    fast_ports = [free_port() for _ in mirrors]  # the mirrors behind the fast link
    for m, port in zip(mirrors, fast_ports, strict=True):
        fast = Link(
            ("127.0.0.1", m.port),
            delay=args.fast_rtt_ms / 2000,
            link_bps=args.fast_link_mbit * 1e6,
            conn_bps=args.fast_conn_mbit * 1e6,
        )
        links.start(fast, port)
    (work / "dockerd").mkdir()
    engine = Dockerd(work / "dockerd", [f"http://127.0.0.1:{p}" for p in fast_ports])
    started.append(engine)
    mirror_ports = fast_ports
    local = Mirror(work / "local", remote, args=("--local",))  # this host's local accelerator
    started.append(local)
    vias: list[int] = []  # the local accelerator's --via in this scenario
    engine_ports: list[int] = fast_ports

    def use_mirrors(ports: list[int], *, engine_only: bool = False) -> None:
        """The engine's registry-mirrors (reloaded with SIGHUP) and skopeo's, for the next pulls."""
        nonlocal mirror_ports, engine_ports
        if not engine_only:
            mirror_ports = ports
        if ports == engine_ports:
            return
        engine_ports = ports
        engine.config.write_text(json.dumps({"registry-mirrors": [f"http://127.0.0.1:{p}" for p in ports]}))
        os.kill(int(engine.pidfile.read_text()), signal.SIGHUP)
        deadline = time.monotonic() + 10
        want = f"127.0.0.1:{ports[0]}"
        while time.monotonic() < deadline and want not in engine.docker("info").stdout:
            time.sleep(0.1)

    cache = work / "dao-cache"
    tools = [t for t in args.tools.split(",") if t in TOOLS]
    results: list[Run] = []

    def reset() -> None:
        engine.reset()
        shutil.rmtree(cache, ignore_errors=True)
        os.sync()  # the last pull's writes reach the disk now, not during the next tool's pull

    def fresh_local() -> None:
        """The local accelerator empty, its --via the scenario's mirrors."""
        local.stop()
        shutil.rmtree(local.data_dir, ignore_errors=True)
        local.args = ("--local", *[a for p in vias for a in ("--via", f"http://127.0.0.1:{p}")])
        local.start()

    repo_digests: dict[tuple[str, str], str] = {}

    def pull(tool: str, ref: str, label: str, *, kill_after: float | None = None) -> tuple[float, bool]:
        if tool in LOCAL_TOOLS:
            use_mirrors([local.port], engine_only=True)
            fresh_local()
            ref = ref.split("/", 1)[1] if ref.startswith("127.0.0.1") else ref  # a Docker Hub name, through it
        else:
            use_mirrors(mirror_ports, engine_only=True)
        reset()
        killer = threading.Timer(kill_after, mirrors[0].kill) if kill_after is not None else None
        env = {**os.environ, "DOCKER_HOST": f"unix://{engine.sock}"}
        if tool in ("docker", "local"):
            argv = ["/usr/bin/docker", "-H", f"unix://{engine.sock}", "pull", ref]
        elif tool in ("dao", "dao-local"):
            argv = [DAO, "pull", "--cache-dir", str(cache), *(["--load"] if tool == "dao" else []), ref]
        else:
            conf = work / "registries.conf"
            conf.write_text(
                '[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n'
                + "".join(f'[[registry.mirror]]\nlocation = "127.0.0.1:{p}"\ninsecure = true\n' for p in mirror_ports)
            )
            source = f"docker://{ref}" if ref.startswith("127.0.0.1") else f"docker://docker.io/{ref}"
            argv = ["skopeo", "--registries-conf", str(conf), "copy", "--src-tls-verify=false",
                    "--dest-daemon-host", f"unix://{engine.sock}", source,
                    f"docker-daemon:{ref.rsplit('/', 1)[-1]}"]  # fmt: skip
        begin = time.monotonic()
        if killer is not None:
            killer.start()
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return time.monotonic() - begin, False
        finally:
            if killer is not None:
                killer.cancel()  # a pull done before the kill leaves the mirror up
                killer.join()
        ok = done.returncode == 0
        seconds = time.monotonic() - begin
        if tool in LOCAL_TOOLS:
            local.stop()  # its idle connections to the mirrors would count against the next tool's (one address)
        (work / f"{label}-{tool}.log").write_text(done.stdout + done.stderr)
        if ok and tool != "skopeo":
            inspect = engine.docker("image", "inspect", "-f", "{{json .RepoDigests}}", ref, check=False)
            repo_digests[(tool, label.split("-", 1)[1])] = inspect.stdout.strip()
        if not ok:
            print(f"    {tool} failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]}", file=sys.stderr)
        return seconds, ok

    scenarios = args.scenarios.split(",")
    for name in built:
        direct = f"127.0.0.1:{link_port}/library/pb-{name}:v1"
        vias = []
        for tool in tools if "a" in scenarios else ():
            print(f"(a) {tool} {name} over the lossy link...", file=sys.stderr)
            seconds, ok = pull(tool, direct, f"a-{name}")
            results.append(Run(tool, name, "a", seconds, ok))
        if not {"b", "l", "c"} & set(scenarios):
            continue
        warm = f"library/pb-{name}:v1"
        for m in mirrors:  # warm both mirrors (not measured)
            argv = [DAO, "pull", "--cache-dir", str(work / "warm"), "--no-engine-mirrors", "--mirror", m.url]
            subprocess.run([*argv, "-o", f"docker-archive:{work / 'warm.tar'}", warm], check=True, capture_output=True)
            shutil.rmtree(work / "warm", ignore_errors=True)
        for key, ports in (("b", fast_ports), ("l", [m.port for m in mirrors])):
            if key not in scenarios:
                continue
            use_mirrors(ports)
            vias = ports
            for round_ in range(max(1, args.repeat)):
                turn = round_ % len(tools)  # interleaved, each round starting with the next tool: a slow moment of
                for tool in tools[turn:] + tools[:turn]:  # the machine, or a pull's place in the round, hits all alike
                    print(f"({key}) {tool} {name} from warm mirrors ({round_ + 1})...", file=sys.stderr)
                    seconds, ok = pull(tool, warm, f"{key}{round_}-{name}")
                    results.append(Run(tool, name, key, seconds, ok))
        use_mirrors(fast_ports)
        vias = fast_ports
        for tool in tools if "c" in scenarios else ():
            print(f"(c) {tool} {name}, mirror 1 killed mid-pull...", file=sys.stderr)
            seconds, ok = pull(tool, warm, f"c-{name}", kill_after=args.kill_after)
            results.append(Run(tool, name, "c", seconds, ok))
            if mirrors[0].proc is None or not mirrors[0].proc.alive():
                mirrors[0].start()  # same port and data: warm again
    report(args, results, tools, repo_digests)


def report(
    args: argparse.Namespace, results: list[Run], tools: list[str], repo_digests: dict[tuple[str, str], str]
) -> None:
    print()
    print(
        f"link: {args.rtt_ms:g} ms RTT, {args.link_mbit:g} mbit shared, {args.conn_mbit:g} mbit per connection; "
        f"big: 1 x {args.size_mib} MiB; many: {args.layers} x {args.layer_mib:g} MiB"
    )
    print(
        f"fast link to the mirrors (b, c): {args.fast_rtt_ms:g} ms RTT, {args.fast_link_mbit:g} mbit shared, "
        f"{args.fast_conn_mbit:g} mbit per connection; (l): the mirrors on loopback, no link at all"
    )
    scenarios = {
        "a": "(a) lossy link, direct",
        "b": "(b) warm mirrors",
        "l": "(l) warm, loopback",
        "c": "(c) mirror 1 killed",
    }
    header = f"{'image':<6} {'scenario':<24}" + "".join(f"{t:>16}" for t in tools)
    print(header)
    print("-" * len(header))
    by: dict[tuple[str, str, str], Run] = {}
    for key in {(r.tool, r.image, r.scenario) for r in results}:  # repeated runs: the median, failed if any failed
        runs = sorted((r for r in results if (r.tool, r.image, r.scenario) == key), key=lambda r: r.seconds)
        by[key] = Run(*key, runs[len(runs) // 2].seconds, all(r.ok for r in runs))
    for image in ("big", "many"):
        for key, label in scenarios.items():
            cells = []
            for tool in tools:
                r = by.get((tool, image, key))
                cells.append("-" if r is None else f"{r.seconds:.2f} s" + ("" if r.ok else " FAIL"))
            print(f"{image:<6} {label:<24}" + "".join(f"{c:>16}" for c in cells))
    if args.repeat > 1:  # every run, in the order pulled: the spread, and whether one tool drifts
        print()
        for tool, image, key in sorted(by, key=lambda k: (("big", "many").index(k[1]), k[2], tools.index(k[0]))):
            runs = [f"{r.seconds:.2f}" for r in results if (r.tool, r.image, r.scenario) == (tool, image, key)]
            if len(runs) > 1:
                print(f"{image} ({key}) {tool}: {' '.join(runs)} s")
    print()
    for image in ("big", "many"):
        for tool, base, key, target in (
            ("dao", "docker", "a", ">= 3.0x"),
            ("dao", "docker", "b", ">= 1.3x"),
            ("dao", "docker", "l", ">= 1.3x"),
            ("local", "docker", "b", ">= 1.0x"),
            ("local", "docker", "l", ">= 1.0x"),
            ("dao-local", "docker", "b", ">= 1.0x"),
            ("dao-local", "docker", "l", ">= 1.0x"),
            ("local", "dao", "a", ">= 0.9x"),
            ("local", "docker", "a", "faster"),
        ):
            d, k = by.get((base, image, key)), by.get((tool, image, key))
            if d and k and d.ok and k.ok:
                ratio = d.seconds / k.seconds
                paired = _paired(results, (base, image, key), (tool, image, key))
                also = f"; round by round, median {paired:.2f}x" if paired is not None else ""
                print(f"{image} {scenarios[key]}: {tool} {ratio:.2f}x {base}'s speed{also} (target {target})")
        for tool in tools:
            c = by.get((tool, image, "c"))
            if c and tool != "docker":
                print(f"{image} (c): {tool} {'completed' if c.ok else 'FAILED'}")
    if repo_digests:
        print()
        print("RepoDigests after each path (the last pull of each image):")
        for image in ("big", "many"):
            for tool in tools:
                if (tool, image) in repo_digests:
                    print(f"  {image:<6} {tool:<10} {repo_digests[(tool, image)]}")


def _paired(results: list[Run], base: tuple[str, str, str], tool: tuple[str, str, str]) -> float | None:
    """The median of the rounds' own ratios: the two pulls of one round ran next to each other, so a slow
    minute of the machine cancels out of their ratio (None with fewer than 3 rounds, or a failed pull)."""
    a = [r for r in results if (r.tool, r.image, r.scenario) == base]
    b = [r for r in results if (r.tool, r.image, r.scenario) == tool]
    if len(a) < 3 or len(a) != len(b) or not all(r.ok for r in a + b):
        return None
    return statistics.median(x.seconds / y.seconds for x, y in zip(a, b, strict=True))


if __name__ == "__main__":
    main()
