"""Processes, ports and HTTP health of the local services (psutil: any POSIX system, not only Linux).

Each service runs in its own session (process group) with its log in a file. A process is named by
(pid, create time), so a recycled pid is never mistaken for it. Stopping ends the group and every
descendant (Ray's workers start their own sessions): SIGTERM first, SIGKILL for whatever lingers.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from cluster.polling import poll_until

HOST = "127.0.0.1"


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    url: str
    log: Path

    def stop(self, timeout: float = 15.0) -> None:
        stop_process_group(self.proc.pid, timeout)
        self.proc.wait(timeout=timeout)

    def log_tail(self, n: int = 40) -> str:
        return log_tail(self.log, n)


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
          base_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `cmd` in a new session (its own process group), stdout and stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                env={**(os.environ if base_env is None else base_env), **(env or {})},
                                start_new_session=True)


def venv_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


# ---- processes --------------------------------------------------------------------------------------

def proc_start(pid: int) -> float | None:
    """The create time of `pid` (with the pid it names one process), None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def is_running(pid: int, start: float | None = None) -> bool:
    """True if `pid` exists, is not a zombie and (when `start` is given) is the process created then."""
    try:
        p = psutil.Process(pid)
    except psutil.Error:
        return False
    return _alive(p) and (start is None or _same_time(p.create_time(), start))


def _same_time(a: float, b: float) -> bool:
    return abs(a - b) < 0.01


def process_tree(pgid: int, not_before: float | None = None) -> list[psutil.Process]:
    """The live members of process group `pgid` and all their descendants.

    `not_before`: ignore group members created before this time (a recycled group id).
    """
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) != pgid or (not_before is not None and p.create_time() < not_before - 0.01):
                continue
            found[p.pid] = p
            found.update((c.pid, c) for c in p.children(recursive=True))
        except (psutil.Error, OSError):
            continue  # exited while we looked
    return [p for p in found.values() if _alive(p)]


def terminate(procs: list[psutil.Process], timeout: float = 15.0) -> list[psutil.Process]:
    """SIGTERM `procs`, SIGKILL the ones still running after `timeout` s; returns any that survive that."""
    left = [p for p in procs if _alive(p)]

    def all_gone() -> bool:
        left[:] = [p for p in left if _alive(p)]
        return not left

    for signal_them, wait in ((psutil.Process.terminate, timeout), (psutil.Process.kill, 5.0)):
        for p in left:
            try:
                signal_them(p)  # psutil refuses a pid that now names another process
            except psutil.Error:
                pass
        if poll_until(all_gone, wait, 0.1):
            break
    return left


def stop_process_group(pid: int, timeout: float = 15.0) -> None:
    """Stop the process group led by `pid` and every descendant: SIGTERM, SIGKILL after `timeout` s."""
    terminate(process_tree(pid), timeout)


# ---- ports ------------------------------------------------------------------------------------------

def port_free(port: int, host: str = HOST) -> bool:
    """True if nothing listens on host:port (SO_REUSEADDR: a closing socket in TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free ports between 20000 and the kernel's ephemeral range.

    The kernel's own pick (bind to port 0) comes from the ephemeral range, where any outgoing connection made
    before our server starts can take it; Ray's workers use 10002-19999. Ports in between are free of both.
    """
    low, high = 20000, _ephemeral_low()
    picked: list[int] = []
    for port in random.Random().sample(range(low, high), k=min(high - low, 64 * n + 64)):
        if port_free(port, HOST):
            picked.append(port)
            if len(picked) == n:
                return picked
    raise RuntimeError(f"fewer than {n} free ports in {low}-{high - 1}")


def _ephemeral_low() -> int:
    """First port of the kernel's ephemeral range (Linux; 32768 elsewhere, the common default).

    The one /proc read left here: psutil reports processes and connections, not the kernel's port range."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(low, 20000 + 1024)


# ---- HTTP health ------------------------------------------------------------------------------------

def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except OSError:
        return False


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Poll `url` until it answers 2xx; fail with the log tail if the process dies or time runs out."""
    def answered() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}:\n{log_tail(log)}")
        return http_ok(url)

    if not poll_until(answered, timeout, 0.3):
        raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n{log_tail(log)}")


def when_healthy(name: str, proc: subprocess.Popen, url: str, health_path: str, log: Path, timeout: float,
                 stop_timeout: float = 15.0) -> Service:
    """The started `proc` as a Service once `url + health_path` answers; stopped (and re-raised) if it never does."""
    try:
        wait_http(f"{url}{health_path}", proc, log, timeout)
    except BaseException:
        stop_process_group(proc.pid, timeout=stop_timeout)
        raise
    return Service(name, proc, url, log)
