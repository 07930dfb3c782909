"""What an agent tells the console about its host: facts (once per connection) and metrics (every
``--interval``), read with psutil.

A sample is a flat JSON object, so the console stores and charts it without knowing psutil:
``at`` (unix time), ``cpu`` (percent of all CPUs since the last sample), ``load`` (1, 5, 15 min),
``mem_used``/``mem_total``, ``swap_used``/``swap_total``, ``disks`` (mount -> used/total bytes),
``net_rx``/``net_tx`` (bytes a second since the last sample, all interfaces but loopback).
"""

from __future__ import annotations

import os
import platform
import socket
import time
from collections.abc import Callable
from typing import Any

import psutil

# Filesystems that are not storage a user would fill: their "disk use" is noise on a chart.
_PSEUDO = {"tmpfs", "devtmpfs", "overlay", "squashfs", "proc", "sysfs", "cgroup", "cgroup2", "nsfs", "ramfs"}
MAX_DISKS = 32


def facts() -> dict[str, Any]:
    uname = platform.uname()
    return {
        "hostname": socket.gethostname(),
        "os": _os_name(),
        "kernel": uname.release,
        "arch": uname.machine,
        "cpus": psutil.cpu_count() or 1,
        "mem_total": psutil.virtual_memory().total,
        "boot_time": psutil.boot_time(),
    }


def _os_name() -> str:
    """``PRETTY_NAME`` of os-release (``Debian GNU/Linux 12 (bookworm)``), else the kernel's name."""
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.strip().partition("=")
                    if key == "PRETTY_NAME":
                        return value.strip('"')
        except OSError:
            continue
    return platform.system()


class Sampler:
    """Takes samples; rates (CPU, network) are over the time since the previous sample."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        psutil.cpu_percent(None)  # the first call only sets the baseline
        self._net = self._net_counters()
        self._net_at = time.monotonic()

    def sample(self) -> dict[str, Any]:
        mem = psutil.virtual_memory()
        swap = psutil.swap_memory()
        now = time.monotonic()
        rx, tx = self._net_counters()
        elapsed = max(now - self._net_at, 1e-3)
        net_rx = max(rx - self._net[0], 0) / elapsed  # a counter reset (an interface gone) is not negative
        net_tx = max(tx - self._net[1], 0) / elapsed
        self._net, self._net_at = (rx, tx), now
        return {
            "at": self.clock(),
            "cpu": psutil.cpu_percent(None),
            "load": list(os.getloadavg()),
            "mem_used": mem.total - mem.available,
            "mem_total": mem.total,
            "swap_used": swap.used,
            "swap_total": swap.total,
            "disks": _disks(),
            "net_rx": round(net_rx, 1),
            "net_tx": round(net_tx, 1),
        }

    @staticmethod
    def _net_counters() -> tuple[int, int]:
        rx = tx = 0
        for name, c in psutil.net_io_counters(pernic=True).items():
            if name == "lo":
                continue
            rx += c.bytes_recv
            tx += c.bytes_sent
        return rx, tx


def _disks() -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for part in psutil.disk_partitions(all=False):
        if part.fstype in _PSEUDO or part.mountpoint in out or len(out) >= MAX_DISKS:
            continue
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:
            continue  # gone between the listing and the look, or not ours to read
        out[part.mountpoint] = {"used": usage.used, "total": usage.total}
    return out
