"""Service names inside pods, without DNS or kube-proxy: each pod's /etc/hosts (a file bind-mounted in its mount
namespace, rewritten in place as Services and their endpoints change).

A Service name resolves to the IPs of its ready endpoints (the pods themselves), as a headless Service would:
there is no ClusterIP routing (no kube-proxy, no iptables here), so a client must use the target port, which in
this project's chart equals the Service port. A Service without ready endpoints has no line.
"""

from __future__ import annotations

from pathlib import Path

BASE = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def service_lines(namespace: str, endpoints: list[dict]) -> list[str]:
    """`ip name name.ns name.ns.svc name.ns.svc.cluster.local` for each ready address of each Endpoints object."""
    lines = []
    for ep in sorted(endpoints, key=lambda e: e["metadata"]["name"]):
        name = ep["metadata"]["name"]
        names = f"{name} {name}.{namespace} {name}.{namespace}.svc {name}.{namespace}.svc.cluster.local"
        ips = sorted({a["ip"] for s in ep.get("subsets") or [] for a in s.get("addresses") or []})
        lines += [f"{ip}\t{names}" for ip in ips]
    return lines


def pod_hosts(pod: dict, pod_ip: str, services: list[str]) -> str:
    """A pod's /etc/hosts: localhost, the pod's own hostname (and its subdomain name), then its namespace's Services."""
    meta, spec = pod["metadata"], pod["spec"]
    hostname = spec.get("hostname") or meta["name"]
    own = hostname
    if spec.get("subdomain"):
        own = f"{hostname}.{spec['subdomain']}.{meta['namespace']}.svc.cluster.local {hostname}"
    return BASE + f"{pod_ip}\t{own}\n" + "".join(f"{line}\n" for line in services)


def write_in_place(path: Path, text: str) -> bool:
    """Rewrites `path` keeping its inode (bind mounts of it follow); whether it changed."""
    if path.is_file() and path.read_text() == text:
        return False
    with open(path, "a+") as f:
        f.seek(0)
        f.truncate()
        f.write(text)
    return True
