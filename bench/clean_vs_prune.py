#!/usr/bin/env python3
"""``dao clean`` next to ``docker system prune`` on the same generated host state, in the same run.

    .venv/bin/python bench/clean_vs_prune.py [--extra 50] [--workdir DIR]

Re-runs itself in a private network namespace. For each tool, a fresh private dockerd gets the host state of
``tests/services/garbage.py`` (every kind of garbage, a running container whose image, volumes and network
must survive, things labelled dao.keep=true, a broken image, the layers of an interrupted pull) plus
``--extra`` more exited containers, dangling images, orphan anonymous volumes and unused networks. Then the
tool runs once, timed, and the table shows what it removed of each kind, what it must not have removed, how
much ``docker system df`` and the disk (``du -sx`` of the data root) went down, and the wall time.

dao runs with ``--grace 0`` (nothing here is older than its default hour) and ``--build-cache``, then also
with ``--images-unused --volumes-named`` (what ``prune -a --volumes`` removes); prune runs as
``docker system prune -f`` and ``-af --volumes``, each with ``--filter label!=dao.keep=true``, the way to tell
it to keep what dao's label keeps.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.services import garbage  # noqa: E402
from tests.services.dockerd import DOCKER_CLI, Dockerd  # noqa: E402
from tests.services.mirror import DAO  # noqa: E402

from bench.common import run_isolated  # noqa: E402

KEEP = ["--filter", "label!=dao.keep=true"]  # how prune is told to keep what dao's label keeps
TOOLS = {
    "dao clean": [DAO, "clean", "--grace", "0", "--build-cache"],
    "dao clean --images-unused --volumes-named": [
        DAO, "clean", "--grace", "0", "--build-cache", "--images-unused", "--volumes-named",
    ],
    "docker system prune -f": [DOCKER_CLI, "system", "prune", "-f", *KEEP],
    "docker system prune -af --volumes": [DOCKER_CLI, "system", "prune", "-af", "--volumes", *KEEP],
}  # fmt: skip
MUST_SURVIVE = ("running container", "its image", "its volumes", "its network", "dao.keep=true things")


@dataclass
class Snapshot:
    containers: set[str]
    images: set[str]
    volumes: set[str]
    networks: set[str]
    layers: int  # layer chains in the layer DB
    df: int  # what docker system df counts
    disk: int  # du -sx of the data root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extra", type=int, default=50, help="more of each cheap kind of garbage")
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temporary directory)")
    args = parser.parse_args()
    run_isolated(args, run, "dao-cleanbench-")


def _get(sock: Path, path: str) -> object:
    conn = http.client.HTTPConnection("docker", timeout=120)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.connect(str(sock))
    try:
        conn.request("GET", f"/v1.41{path}")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def snapshot(engine: Dockerd) -> Snapshot:
    df = _get(engine.sock, "/system/df")
    assert isinstance(df, dict)
    df_total = (
        df["LayersSize"]
        + sum(c.get("SizeRw", 0) for c in df["Containers"])
        + sum(max(v["UsageData"]["Size"], 0) for v in df["Volumes"])
        + sum(b["Size"] for b in df.get("BuildCache") or [] if not b["Shared"])
    )
    du = subprocess.run(["du", "-sbx", str(engine.data_root)], capture_output=True, text=True, timeout=300)
    layerdb = engine.data_root / "image" / "overlay2" / "layerdb" / "sha256"
    return Snapshot(
        {c["Id"] for c in _get(engine.sock, "/containers/json?all=1")},  # type: ignore[union-attr]
        {i["Id"] for i in _get(engine.sock, "/images/json?all=1")},  # type: ignore[union-attr]
        {v["Name"] for v in _get(engine.sock, "/volumes")["Volumes"] or []},  # type: ignore[index]
        {n["Id"] for n in _get(engine.sock, "/networks")},  # type: ignore[union-attr]
        len(list(layerdb.iterdir())),
        df_total,
        int(du.stdout.split()[0]),
    )


def run(args: argparse.Namespace, work: Path) -> None:
    rows = []
    for tool, argv in TOOLS.items():
        wd = work / tool.split()[0] / str(len(rows))
        wd.mkdir(parents=True)
        engine = Dockerd(wd, [])
        try:
            print(f"[{tool}] building the host state ...", file=sys.stderr, flush=True)
            g = garbage.make(engine, wd, args.extra)
            nets = {n["Name"]: n["Id"] for n in _get(engine.sock, "/networks")}  # type: ignore[union-attr]
            before = snapshot(engine)
            env = {"DOCKER_HOST": f"unix://{engine.sock}", "PATH": "/usr/bin:/bin"}
            if tool.startswith("dao"):  # the dry run first: it is what a careful person runs
                t0 = time.monotonic()
                dry = subprocess.run([*argv, "-d", "--json"], capture_output=True, text=True, env=env, timeout=600)
                dry_s = time.monotonic() - t0
                listed = len(json.loads(dry.stdout)["items"]) if dry.returncode == 0 else -1
            t0 = time.monotonic()
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
            seconds = time.monotonic() - t0
            (wd / "output.txt").write_text(proc.stdout + proc.stderr)
            after = snapshot(engine)
            survivors = {
                "running container": g.ids["running"] in after.containers,
                "its image": g.ids["base"] in after.images,
                "its volumes": {"keepvol", g.ids["running-vol"]} <= after.volumes,
                "its network": nets["keepnet"] in after.networks,
                "dao.keep=true things": g.ids["kept-old"] in after.images and nets["kept-net"] in after.networks,
            }
            rows.append(
                {
                    "tool": tool,
                    "ok": proc.returncode == 0,
                    "containers": len(before.containers - after.containers),
                    "images": len(before.images - after.images - {g.ids["broken"]}),
                    "broken image": "yes" if g.ids["broken"] not in after.images else "no",
                    "orphan layers": "yes" if not any(p.exists() for p in g.ghost_dirs) else "no",
                    "volumes": len(before.volumes - after.volumes),
                    "networks": len(before.networks - after.networks),
                    "lost": ", ".join(k for k, ok in survivors.items() if not ok) or "-",
                    "df freed MB": (before.df - after.df) / 1e6,
                    "disk freed MB": (before.disk - after.disk) / 1e6,
                    "seconds": seconds,
                    "dry run": f"{listed} items in {dry_s:.2f} s" if tool.startswith("dao") else "none",
                }
            )
        finally:
            engine.stop()
    print_table(rows, args)


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nSame host state for each tool (tests/services/garbage.py, --extra {args.extra}); seconds = wall time")
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(_fmt(r[k])) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(_fmt(r[k]).ljust(widths[k]) for k in keys))


def _fmt(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
