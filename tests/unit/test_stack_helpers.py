"""`edp stack` helpers without starting the services: ports, state files, configs, process trees."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster import local_services as ls
from cluster import stack as st


def test_parse_ports():
    assert st.parse_ports(["mlflow=5001, s3=8334", "ray-dashboard=8266"]) == {
        "mlflow": 5001, "s3": 8334, "ray_dashboard": 8266}
    assert st.parse_ports(None) == {}
    with pytest.raises(ValueError, match="'mlfow=1'.*one of"):
        st.parse_ports(["mlfow=1"])
    with pytest.raises(ValueError, match="'s3=99999'.*1..65535"):
        st.parse_ports(["s3=99999"])
    with pytest.raises(ValueError, match="'s3'"):
        st.parse_ports(["s3"])


def test_check_ports_names_the_taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        ports = {**dict(zip(st.DEFAULT_PORTS, ls.free_ports(len(st.DEFAULT_PORTS)), strict=True)), "mlflow": taken}
        with pytest.raises(st.StackError, match=f"port {taken} \\(mlflow\\) on 127.0.0.1 is already in use"):
            st.check_ports(ports, {"mlflow"})
        st.check_ports(ports, {"s3", "ray", "prometheus"})  # not ours to start: not checked
    ports["s3"] = ports["prometheus"]
    with pytest.raises(st.StackError, match="given to both"):
        st.check_ports(ports, {"s3"})


def test_credentials_are_generated_once_and_private(tmp_path):
    stack = st.Stack(tmp_path / "stack")
    key, secret = stack.credentials()
    assert stack.credentials() == (key, secret) and len(secret) >= 32
    assert stat.S_IMODE((tmp_path / "stack" / "credentials.json").stat().st_mode) == 0o600


def test_env_file(tmp_path):
    stack = st.Stack(tmp_path)
    env = st.stack_env(stack, {**st.DEFAULT_PORTS, "mlflow": 5001})
    path = st.write_env_file(stack, {**env, "EDP_HOME": "/path with space/x"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    out = subprocess.run(["sh", "-c", f". '{path}' && echo \"$MLFLOW_TRACKING_URI|$EDP_HOME|$RAY_ADDRESS\""],
                         capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]})
    assert out.stdout.strip() == "http://127.0.0.1:5001|/path with space/x|http://127.0.0.1:8265"
    assert env["AWS_ACCESS_KEY_ID"] == stack.credentials()[0]


def test_prometheus_config_is_valid_yaml():
    config = yaml.safe_load(ls.prometheus_config({"ray": ["127.0.0.1:8080", "127.0.0.1:44217"]}, "5s"))
    assert config["global"]["scrape_interval"] == "5s"
    assert config["scrape_configs"] == [{"job_name": "ray", "static_configs": [
        {"targets": ["127.0.0.1:8080", "127.0.0.1:44217"]}]}]


def test_ray_temp_dir_is_short_enough_for_unix_sockets():
    assert ls.ray_temp_dir(Path("/srv/edp/stack")) == Path("/srv/edp/stack/tmp")
    deep = Path("/srv") / ("d" * 80)
    short = ls.ray_temp_dir(deep)
    assert str(short).startswith("/tmp/edp-ray-") and len(str(short)) + ls.RAY_SOCKET_SUFFIX <= 107
    assert ls.ray_temp_dir(deep) == short


def test_status_of_a_stack_never_started(tmp_path):
    rows = st.status(tmp_path)
    assert [r.name for r in rows] == [*st.SERVICES, "serve"]
    assert not any(r.running or r.healthy or r.pid for r in rows)
    assert st.down(tmp_path, log=lambda line: None) == {}


# A process group whose leader ignores SIGTERM, with a child that left the group (like Ray's workers).
TREE = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_terminate_a_tree_escalates_to_sigkill_and_reaches_other_sessions():
    leader = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        child = int(leader.stdout.readline())
        tree = ls.process_tree(set(), {leader.pid})
        assert {leader.pid, child} <= tree
        assert ls.process_tree(set(), {leader.pid}, not_before=ls.proc_start(leader.pid) + 10**6) == set()
        t0 = time.monotonic()
        assert ls.terminate(tree, timeout=0.5) == set()
        assert time.monotonic() - t0 < 5
        leader.wait(timeout=5)
        assert leader.returncode == -9  # ignored SIGTERM, so SIGKILL
        assert not ls.is_running(child)
    finally:
        for pid in (leader.pid,):
            try:
                os.killpg(pid, 9)
            except ProcessLookupError:
                pass


def test_is_running_checks_the_start_time():
    me = os.getpid()
    assert ls.is_running(me) and ls.is_running(me, ls.proc_start(me))
    assert not ls.is_running(me, ls.proc_start(me) + 1)
