"""A host of its own for a test: a network namespace whose only link is one veth pair to the test's
namespace, and whose only route is the pair's /30. New connections *into* it are dropped (nftables), so
whatever works there works outbound only, as behind NAT or a firewall. Made and removed by the test itself:
nothing in it can reach anything but the test's namespace."""

from __future__ import annotations

import os
import subprocess


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class NetHost:
    def __init__(self, index: int, open_ports: tuple[int, ...] = ()) -> None:
        """``open_ports``: TCP ports that do take new connections in (an app's published port)."""
        assert 0 < index < 250
        self.name = f"dao-h{index}-{os.getpid()}"
        self.outside_if, self.inside_if = f"dvc{index}", f"dvh{index}"
        self.outside, self.inside = f"10.213.{index}.1", f"10.213.{index}.2"  # the console's side, the host's
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.outside_if, "type", "veth", "peer", "name", self.inside_if, "netns", self.name)
            _ip("addr", "add", f"{self.outside}/30", "dev", self.outside_if)
            _ip("link", "set", self.outside_if, "up")
            for args in (
                ("link", "set", "lo", "up"),
                ("addr", "add", f"{self.inside}/30", "dev", self.inside_if),
                ("link", "set", self.inside_if, "up"),
            ):
                _ip("netns", "exec", self.name, "ip", *args)
            opened = "".join(f'  iifname "{self.inside_if}" tcp dport {p} accept\n' for p in open_ports)
            rules = (
                "table inet dao {\n chain inbound {\n  type filter hook input priority 0; policy accept;\n"
                f'{opened}  iifname "{self.inside_if}" ct state new drop\n }}\n}}\n'
            )
            subprocess.run(["ip", "netns", "exec", self.name, "nft", "-f", "-"], input=rules, text=True, check=True)
        except BaseException:
            self.close()
            raise

    def run(self, *argv: str) -> list[str]:
        """``argv`` as a command run inside the host: its network, the test's files and mounts (nsenter, not
        ``ip netns exec``, which mounts a /sys of its own and hides the cgroups dockerd needs)."""
        return ["nsenter", f"--net=/run/netns/{self.name}", "--", *argv]

    def cut(self) -> None:
        """Take the link down: nothing passes either way, and neither side is told (as a cable pulled)."""
        _ip("link", "set", self.outside_if, "down")

    def mend(self) -> None:
        _ip("link", "set", self.outside_if, "up")

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False, timeout=30)
        subprocess.run(["ip", "link", "del", self.outside_if], capture_output=True, check=False, timeout=30)
