"""Start and stop the real local services the platform talks to (MLflow server, ...), on 127.0.0.1.

Used by `edp stack` and by the integration tests, so both run the same commands. Each service
runs in its own process group with its log in a file; `stop()` ends the whole group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    url: str
    log: Path

    def stop(self, timeout: float = 15.0) -> None:
        stop_process_group(self.proc.pid, timeout)
        self.proc.wait(timeout=timeout)


def stop_process_group(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the process group of `pid`, SIGKILL what is left after `timeout` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Poll `url` until it answers 2xx; fail with the log tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if 200 <= r.status < 300:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-2000:]}")


def spawn(name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)


def start_mlflow(state_dir: Path, port: int | None = None, artifacts_destination: str | None = None,
                 env: dict[str, str] | None = None, timeout: float = 90.0) -> Service:
    """An MLflow tracking server on a sqlite database, proxying artifacts (local dir or s3://).

    One worker and no job runner (PLATFORM-NOTES: ~0.5 GB instead of ~3 GB).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    cmd = [mlflow_bin, "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
           "--artifacts-destination", artifacts_destination or str(state_dir / "artifacts")]
    log = state_dir / "mlflow.log"
    proc = spawn("mlflow", cmd, log, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, log, timeout)
    except RuntimeError:
        stop_process_group(proc.pid)
        raise
    return Service("mlflow", proc, url, log)
