"""Pod networking for the process kubelet: one Linux bridge on the host, one network namespace per pod.

    bridge = Bridge("edp-br0", "10.244.0.1/16").create()
    net = PodNetwork.create("edp-3f2a9c1e", "10.244.1.2", bridge)   # netns + veth (eth0 in the pod) + lo + route
    net.delete()
    bridge.delete()

Every pod's eth0 is a veth whose host end is a port of the bridge, so pods reach each other on their own
addresses and the host on the bridge's address (the default route); nothing is routed off the machine (no NAT).
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def link_exists(name: str) -> bool:
    return ip("link", "show", name, check=False).returncode == 0


@dataclass
class Bridge:
    name: str
    address: str  # the host's address on it, with the prefix: "10.244.0.1/16"

    @property
    def gateway(self) -> str:
        return self.address.split("/")[0]

    @property
    def prefix(self) -> int:
        return int(self.address.split("/")[1])

    def create(self) -> Bridge:
        if link_exists(self.name):
            raise RuntimeError(f"network device {self.name} already exists: another test cluster is running, or one "
                               f"was killed before cleaning up (remove it with `ip link del {self.name}`)")
        ip("link", "add", self.name, "type", "bridge")
        ip("addr", "add", self.address, "dev", self.name)
        ip("link", "set", self.name, "up")
        return self

    def delete(self) -> None:
        ip("link", "del", self.name, check=False)


@dataclass
class PodNetwork:
    netns: str
    pod_ip: str
    host_veth: str

    @classmethod
    def create(cls, netns: str, pod_ip: str, bridge: Bridge) -> PodNetwork:
        """The pod's netns with eth0 = pod_ip on the bridge's subnet, lo up, default route via the bridge."""
        net = cls(netns, pod_ip, "ve" + netns[-10:])
        try:
            ip("netns", "add", netns)
            ip("link", "add", net.host_veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            ip("link", "set", net.host_veth, "master", bridge.name, "up")
            ip("-n", netns, "addr", "add", f"{pod_ip}/{bridge.prefix}", "dev", "eth0")
            ip("-n", netns, "link", "set", "eth0", "up")
            ip("-n", netns, "link", "set", "lo", "up")
            ip("-n", netns, "route", "add", "default", "via", bridge.gateway)
        except BaseException:
            net.delete()
            raise
        return net

    def delete(self) -> None:
        """Removes the veth pair and the netns (idempotent)."""
        ip("link", "del", self.host_veth, check=False)
        ip("netns", "del", self.netns, check=False)


def netns_exists(name: str) -> bool:
    return name in ip("netns", "list").stdout.split()


class Ipam:
    """Pod addresses per node: node n gets 10.244.(n+1).0/24 (its podCIDR), addresses .2 to .254 handed out."""

    def __init__(self, cluster_cidr: str, node_index: int):
        net = ipaddress.ip_network(cluster_cidr)
        self.cidr = list(net.subnets(new_prefix=24))[node_index + 1]
        self.free = [str(a) for a in list(self.cidr.hosts())[1:]]
        self.used: set[str] = set()

    def allocate(self) -> str:
        for a in self.free:
            if a not in self.used:
                self.used.add(a)
                return a
        raise RuntimeError(f"no pod address left in {self.cidr}")

    def release(self, address: str) -> None:
        self.used.discard(address)
