"""`edp stack` helpers without starting the services: ports, state files, configs, process trees."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from cluster.local import processes as ps
from cluster.local import services as ls
from cluster.local import stack as st
from cluster.polling import poll_until


def test_free_ports_avoid_the_ephemeral_range_and_ports_in_use(monkeypatch):
    """Ports come from below the kernel's ephemeral range, where outgoing connections cannot take them."""
    monkeypatch.setattr(ps, "_ephemeral_low", lambda: 20000 + 1024)
    busy = {20000 + i for i in range(0, 1024, 2)}
    monkeypatch.setattr(ps, "port_free", lambda port, host=ps.HOST: port not in busy)
    ports = ps.free_ports(100)
    assert len(set(ports)) == 100
    assert all(20000 <= p < 21024 and p not in busy for p in ports)
    monkeypatch.setattr(ps, "port_free", lambda port, host=ps.HOST: False)
    with pytest.raises(RuntimeError, match="fewer than 3 free ports"):
        ps.free_ports(3)


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
        ports = {**dict(zip(st.DEFAULT_PORTS, ps.free_ports(len(st.DEFAULT_PORTS)), strict=True)), "mlflow": taken}
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
    out = subprocess.run(["sh", "-c", f". '{path}' && echo \"$MLFLOW_TRACKING_URI|$EDP_HOME|$RAY_ADDRESS|"
                          f"$RAY_API_SERVER_ADDRESS|$EDP_CHECKPOINT_URI\""],
                         capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]})
    assert out.stdout.strip() == ("http://127.0.0.1:5001|/path with space/x|127.0.0.1:6379|http://127.0.0.1:8265|"
                                  "s3://edp/checkpoints")
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
        tree = ps.process_tree(leader.pid)
        assert {leader.pid, child} <= {p.pid for p in tree}
        assert ps.process_tree(leader.pid, not_before=ps.proc_start(leader.pid) + 10**6) == []
        t0 = time.monotonic()
        assert ps.terminate(tree, timeout=0.5) == []
        assert time.monotonic() - t0 < 5
        leader.wait(timeout=5)
        assert leader.returncode == -9  # ignored SIGTERM, so SIGKILL
        assert not ps.is_running(child)
    finally:
        for pid in (leader.pid,):
            try:
                os.killpg(pid, 9)
            except ProcessLookupError:
                pass


def test_is_running_checks_the_start_time():
    me = os.getpid()
    assert ps.is_running(me) and ps.is_running(me, ps.proc_start(me))
    assert not ps.is_running(me, ps.proc_start(me) + 1)


def test_logs_of_a_stopped_service_and_follow(tmp_path):
    from typer.testing import CliRunner

    from cluster.cli import app

    with pytest.raises(st.StackError, match="no log of mlflow yet"):
        st.log_file("mlflow", tmp_path)
    with pytest.raises(st.StackError, match="unknown service 'mlfow'"):
        st.log_file("mlfow", tmp_path)
    log = tmp_path / "mlflow" / "mlflow.log"  # where `up` writes it: readable after `down` too
    log.parent.mkdir()
    log.write_text("".join(f"line {i}\n" for i in range(50)))
    assert st.log_file("mlflow", tmp_path) == log
    out = CliRunner().invoke(app, ["stack", "logs", "mlflow", "-n", "3", "--state-dir", str(tmp_path)])
    assert out.exit_code == 0 and out.output.splitlines() == ["line 47", "line 48", "line 49"]
    out = CliRunner().invoke(app, ["stack", "logs", "ray", "--state-dir", str(tmp_path)])
    assert out.exit_code == 2 and "no log of ray yet" in out.output

    seen: list[str] = []
    follower = threading.Thread(target=st.follow, args=(log, seen.append, lambda: "new 2\n" in "".join(seen), 0.05))
    follower.start()
    time.sleep(0.2)
    with log.open("a") as f:
        f.write("new 1\n")
        f.flush()
        f.write("new 2\n")
    follower.join(timeout=5)
    assert not follower.is_alive() and "".join(seen) == "new 1\nnew 2\n"  # only what came after


def test_poll_until_returns_the_first_truthy_answer_or_none_at_the_deadline():
    answers = iter([None, 0, "ready"])
    assert poll_until(lambda: next(answers), timeout=5, interval=0.01) == "ready"
    calls = []
    t0 = time.monotonic()
    assert poll_until(lambda: calls.append(1), timeout=0.2, interval=0.05) is None
    assert 0.2 <= time.monotonic() - t0 < 1 and len(calls) >= 3
