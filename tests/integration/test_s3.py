"""fetch_s3_prefix and load_splits against a real SeaweedFS S3 server (see conftest.s3_server)."""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections import Counter
from pathlib import Path

import pytest

from trainers.data.records import DataError
from trainers.data.remote import MANIFEST_NAME, fetch_s3_prefix, s3_client

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """Credentials for the boto3 default chain, isolated from ~/.aws and any ambient AWS_* settings."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    return s3_server


@pytest.fixture
def bucket(s3_server):
    name = f"edp-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


def put(server, bucket: str, objects: dict[str, bytes]) -> None:
    client = server.client()
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


def counting_client(endpoint_url: str) -> tuple[object, Counter]:
    """The client fetch_s3_prefix would build, with a count of each S3 operation it sends."""
    client, calls = s3_client(endpoint_url), Counter()
    client.meta.events.register("before-call.s3.*", lambda model, **_: calls.update([model.name]))
    return client, calls


FILES = {
    "ed/ed_train.jsonl": b'{"a": 1}\n',
    "ed/ed_valid.jsonl": b'{"b": 2}\n',
    "ed/extra/notes.txt": b"nested keys keep their relative path\n",
    "ed_old/ed_train.jsonl": b"a sibling prefix, not under ed/\n",
}


def test_fetch_mirrors_prefix_then_hits_cache(s3_env, bucket, tmp_path):
    put(s3_env, bucket, FILES)
    client, calls = counting_client(s3_env.url)
    root = fetch_s3_prefix(f"s3://{bucket}/ed", tmp_path, client=client)

    assert root == tmp_path / bucket / "ed"
    got = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert got.pop(MANIFEST_NAME)
    assert got == {k.removeprefix("ed/"): v for k, v in FILES.items() if k.startswith("ed/")}
    assert not (tmp_path / bucket / "ed_old").exists()
    assert calls["GetObject"] == 3
    manifest = json.loads((root / MANIFEST_NAME).read_text())["objects"]
    assert set(manifest) == {"ed/ed_train.jsonl", "ed/ed_valid.jsonl", "ed/extra/notes.txt"}
    assert manifest["ed/ed_train.jsonl"]["size"] == len(FILES["ed/ed_train.jsonl"])

    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*.jsonl")}
    calls.clear()
    assert fetch_s3_prefix(f"s3://{bucket}/ed/", tmp_path, client=client) == root
    assert calls["GetObject"] == 0 and calls["ListObjectsV2"] == 1
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*.jsonl")} == before


def test_only_changed_objects_are_downloaded_again(s3_env, bucket, tmp_path):
    put(s3_env, bucket, FILES)
    client, calls = counting_client(s3_env.url)
    root = fetch_s3_prefix(f"s3://{bucket}/ed", tmp_path, client=client)
    valid_ino = (root / "ed_valid.jsonl").stat().st_ino

    put(s3_env, bucket, {"ed/ed_train.jsonl": b'{"a": "changed"}\n'})
    s3_env.client().delete_object(Bucket=bucket, Key="ed/extra/notes.txt")
    calls.clear()
    fetch_s3_prefix(f"s3://{bucket}/ed", tmp_path, client=client)

    assert calls["GetObject"] == 1
    assert (root / "ed_train.jsonl").read_bytes() == b'{"a": "changed"}\n'
    assert (root / "ed_valid.jsonl").stat().st_ino == valid_ino
    assert not (root / "extra" / "notes.txt").exists()  # deleted remotely -> dropped locally
    assert not list(root.rglob("*.part"))


def test_a_locally_damaged_file_is_downloaded_again(s3_env, bucket, tmp_path):
    put(s3_env, bucket, FILES)
    root = fetch_s3_prefix(f"s3://{bucket}/ed", tmp_path, endpoint_url=s3_env.url)
    (root / "ed_valid.jsonl").write_bytes(b"cut")  # other size
    (root / "ed_train.jsonl").write_bytes(b"edited!!\n")  # same size, other mtime
    os.utime(root / "ed_train.jsonl", ns=(10**18, 10**18))
    fetch_s3_prefix(f"s3://{bucket}/ed", tmp_path, endpoint_url=s3_env.url)
    assert (root / "ed_valid.jsonl").read_bytes() == FILES["ed/ed_valid.jsonl"]
    assert (root / "ed_train.jsonl").read_bytes() == FILES["ed/ed_train.jsonl"]


def test_single_object_uri_returns_the_file(s3_env, bucket, tmp_path):
    put(s3_env, bucket, FILES)
    path = fetch_s3_prefix(f"s3://{bucket}/ed/ed_valid.jsonl", tmp_path, endpoint_url=s3_env.url)
    assert path == tmp_path / bucket / "ed" / "ed_valid.jsonl"
    assert path.read_bytes() == FILES["ed/ed_valid.jsonl"]
    assert not (path.parent / "ed_train.jsonl").exists()


def test_whole_bucket_and_endpoint_from_environment(s3_env, bucket, tmp_path, monkeypatch):
    put(s3_env, bucket, {"a.txt": b"A", "d/b.txt": b"B"})
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.url)
    root = fetch_s3_prefix(f"s3://{bucket}", tmp_path / "one")
    assert root == tmp_path / "one" / bucket and (root / "d" / "b.txt").read_bytes() == b"B"

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.url)
    assert (fetch_s3_prefix(f"s3://{bucket}/", tmp_path / "two") / "a.txt").read_bytes() == b"A"


@pytest.mark.parametrize("which", ["secret", "access_key"])
def test_wrong_credentials_give_a_clear_error(s3_env, bucket, tmp_path, monkeypatch, which):
    put(s3_env, bucket, FILES)
    if which == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        key = s3_env.access_key
    else:
        key = "AKIAUNKNOWNKEY000000"
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    with pytest.raises(DataError) as err:
        fetch_s3_prefix(f"s3://{bucket}/ed", tmp_path, endpoint_url=s3_env.url)
    msg = str(err.value)
    assert f"S3 rejected the credentials for s3://{bucket}/ed" in msg
    assert f"AWS_ACCESS_KEY_ID={key[:4]}…" in msg and key not in msg and s3_env.secret_key not in msg
    assert not (tmp_path / bucket).exists()


def test_missing_bucket(s3_env, tmp_path):
    with pytest.raises(DataError, match="bucket 'edp-no-such-bucket' does not exist"):
        fetch_s3_prefix("s3://edp-no-such-bucket/ed", tmp_path, endpoint_url=s3_env.url)


def test_prefix_without_objects(s3_env, bucket, tmp_path):
    put(s3_env, bucket, FILES)
    with pytest.raises(DataError, match=f"no objects under s3://{bucket}/nothing-here"):
        fetch_s3_prefix(f"s3://{bucket}/nothing-here", tmp_path, endpoint_url=s3_env.url)


def test_unreachable_endpoint_is_named(s3_env, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    with pytest.raises(DataError, match="cannot reach the S3 endpoint") as err:
        fetch_s3_prefix("s3://edp-any/ed", tmp_path, endpoint_url=endpoint)
    assert endpoint in str(err.value)


def conversation(conv_id: str, emotion: str, turns: int) -> bytes:
    record = {
        "conv_id": conv_id, "emotion": emotion, "situation": f"situation of {conv_id}",
        "utterances": [f"turn {i} of {conv_id}" for i in range(turns)],
        "speakers": ["speaker" if i % 2 == 0 else "listener" for i in range(turns)],
    }
    return json.dumps(record).encode() + b"\n"


def test_load_splits_from_s3(s3_env, bucket, tmp_path):
    from trainers.data.sources import load_splits

    train = b"".join(conversation(f"hit:{i}_conv:{i}", "grateful", 2 + i % 3) for i in range(5))
    valid = b"".join(conversation(f"hit:9{i}_conv:9{i}", "afraid", 4) for i in range(2))
    put(s3_env, bucket, {"ed/ed_train.jsonl": train, "ed/ed_valid.jsonl": valid})

    reports = load_splits(f"s3://{bucket}/ed", cache_dir=tmp_path, endpoint_url=s3_env.url)
    assert {s: len(r.conversations) for s, r in reports.items()} == {"train": 5, "valid": 2}
    assert all(not r.invalid for r in reports.values())
    assert reports["valid"].conversations[0].emotion == "afraid"


def test_the_charts_bucket_hook_creates_the_bucket_once_the_server_answers(s3_env, tmp_path):
    """helm/.../files/scripts/create_bucket.py (the SeaweedFS hook Job's script, rendered verbatim) against real S3:
    it creates a missing bucket, is idempotent, and fails with the endpoint named when nothing answers in time."""
    import subprocess
    import sys

    chart = Path(__file__).resolve().parents[2] / "helm" / "empathy-platform"
    script = chart / "files" / "scripts" / "create_bucket.py"
    name = f"edp-hook-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_env.url, "AWS_DEFAULT_REGION": "us-east-1"}
    first = subprocess.run([sys.executable, str(script), name], capture_output=True, text=True, env=env, timeout=60)
    again = subprocess.run([sys.executable, str(script), name], capture_output=True, text=True, env=env, timeout=60)
    assert (first.returncode, again.returncode) == (0, 0), first.stderr + again.stderr
    assert f"bucket {name} created" in first.stdout and f"bucket {name} exists" in again.stdout
    s3_env.client().head_bucket(Bucket=name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    down = subprocess.run([sys.executable, str(script), name, "1"], capture_output=True, text=True,
                          env={**env, "AWS_ENDPOINT_URL": dead}, timeout=60)
    assert down.returncode == 1 and "not reachable" in down.stderr


def test_a_published_directory_is_fetched_whole_or_not_at_all(s3_env, bucket, tmp_path):
    from trainers.data.remote import fetch_dir, publish_dir

    src = tmp_path / "entry"
    (src / "sub").mkdir(parents=True)
    (src / "train.pkl").write_bytes(os.urandom(3000))
    (src / "sub" / "vectors.npy").write_bytes(b"v" * 10)
    (src / "manifest.json").write_text('{"key": "k"}')
    uri = f"s3://{bucket}/prepared/k"
    endpoint = s3_env.url
    assert not fetch_dir(uri, tmp_path / "absent", endpoint_url=endpoint)  # nothing published yet
    assert not (tmp_path / "absent").exists()
    client, _ = counting_client(s3_env.url)
    order = []
    client.meta.events.register("before-parameter-build.s3.PutObject", lambda params, **_: order.append(params["Key"]))
    assert publish_dir(src, uri, client=client) == 3
    assert order[-1] == "prepared/k/manifest.json"  # the completion marker goes up last
    assert publish_dir(src, uri, client=client) == 0 and len(order) == 3  # complete already: nothing re-sent
    got = tmp_path / "copy"
    assert fetch_dir(uri, got, endpoint_url=endpoint)
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == \
        ["manifest.json", "sub/vectors.npy", "train.pkl"]
    assert (got / "train.pkl").read_bytes() == (src / "train.pkl").read_bytes()
    assert fetch_dir(uri, got, endpoint_url=endpoint)  # already there (another trial won the race): kept, no error
    assert not list(tmp_path.glob(".copy.fetch-*"))


def test_a_node_fetches_a_prepared_entry_another_node_published_and_never_rebuilds_it(
        s3_env, bucket, prepared_sample, tmp_path, monkeypatch):
    """Node A (the driver) publishes its entry; node B (an empty cache) fetches it and never runs spaCy."""
    import shutil

    from trainers.config import DataConfig, load_config
    from trainers.data import prepare as prep

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.url)
    shared = f"s3://{bucket}/ckpt/prepared"
    node_a = tmp_path / "a"
    shutil.copytree(prepared_sample.path, node_a / prepared_sample.path.name)  # A prepared it earlier, locally
    a = prep.prepare(load_config(DataConfig, source="sample", cache_dir=str(node_a), shared_cache=shared),
                     publish=True)
    assert a.cache_hit and a.manifest["key"] == prepared_sample.manifest["key"]
    keys = keys_of(s3_env, bucket, f"ckpt/prepared/{a.manifest['key']}/")
    assert {"manifest.json", "vocab.json", "train.pkl", "valid.pkl"} <= {k.rsplit("/", 1)[1] for k in keys}

    def no_spacy(*args, **kwargs):
        raise AssertionError("node B re-ran the spaCy pipeline for an entry that exists in S3")

    monkeypatch.setattr(prep.ann, "load_pipeline", no_spacy)
    b = prep.prepare(load_config(DataConfig, source="sample", cache_dir=str(tmp_path / "b"),
                                 shared_cache=shared))
    assert b.cache_hit and b.path == tmp_path / "b" / a.manifest["key"]
    assert len(b.split("train").examples) == len(prepared_sample.split("train").examples)
    assert b.vocab.itos == prepared_sample.vocab.itos


def keys_of(server, bucket: str, prefix: str) -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]
