"""fetch_s3_prefix logic against moto's in-process S3 mock (the real server is in tests/integration)."""

from __future__ import annotations

from collections import Counter

import pytest

from trainers.data.records import DataError
from trainers.data.remote import fetch_s3_prefix, parse_s3_uri

moto = pytest.importorskip("moto")


@pytest.mark.parametrize(
    "uri, expected",
    [("s3://edp-data/ed", ("edp-data", "ed")), ("s3://edp-data", ("edp-data", "")),
     ("s3://edp.data/a/b/c.jsonl", ("edp.data", "a/b/c.jsonl")), ("s3://edp-data/ed/", ("edp-data", "ed/"))],
)
def test_parse_s3_uri(uri, expected):
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", ["http://edp/ed", "s3:/edp/ed", "s3://", "s3://Upper/ed", "s3://ab/x",
                                 "s3://edp-data/../etc"])
def test_bad_uri(uri, tmp_path):
    with pytest.raises(DataError, match="bad S3 URI"):
        fetch_s3_prefix(uri, tmp_path, client=object())


@pytest.fixture
def mock_s3(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto.mock_aws():
        from trainers.data.remote import s3_client

        client, calls = s3_client(), Counter()
        client.meta.events.register("before-call.s3.*", lambda model, **_: calls.update([model.name]))
        client.create_bucket(Bucket="edp-data")
        yield client, calls


def test_cache_hit_and_changed_object(mock_s3, tmp_path):
    client, calls = mock_s3
    for i in range(3):
        client.put_object(Bucket="edp-data", Key=f"ed/part{i}.jsonl", Body=f"{i}\n".encode())
    root = fetch_s3_prefix("s3://edp-data/ed", tmp_path, client=client)
    assert sorted(p.name for p in root.glob("*.jsonl")) == ["part0.jsonl", "part1.jsonl", "part2.jsonl"]
    assert calls["GetObject"] == 3

    calls.clear()
    fetch_s3_prefix("s3://edp-data/ed", tmp_path, client=client)
    assert calls["GetObject"] == 0

    client.put_object(Bucket="edp-data", Key="ed/part1.jsonl", Body=b"new\n")
    fetch_s3_prefix("s3://edp-data/ed", tmp_path, client=client)
    assert calls["GetObject"] == 1 and (root / "part1.jsonl").read_bytes() == b"new\n"


def test_paginated_listing(mock_s3, tmp_path):
    client, calls = mock_s3
    for i in range(1005):  # > 1000: ListObjectsV2 returns two pages
        client.put_object(Bucket="edp-data", Key=f"many/{i:04d}", Body=b"x")
    root = fetch_s3_prefix("s3://edp-data/many", tmp_path, client=client)
    assert calls["ListObjectsV2"] == 2
    assert len([p for p in root.iterdir() if not p.name.startswith(".")]) == 1005


def test_key_escaping_the_cache_is_refused(mock_s3, tmp_path):
    client, _ = mock_s3
    client.put_object(Bucket="edp-data", Key="ed/../../outside.txt", Body=b"x")
    with pytest.raises(DataError, match="cannot be stored as a local file"):
        fetch_s3_prefix("s3://edp-data/ed", tmp_path / "cache", client=client)
    assert not (tmp_path / "outside.txt").exists()


def test_access_denied_is_a_credentials_error(mock_s3, tmp_path):
    from botocore.exceptions import ClientError

    client, _ = mock_s3

    def deny(**_):
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"},
                           "ResponseMetadata": {"HTTPStatusCode": 403}}, "ListObjectsV2")

    client.meta.events.register("before-call.s3.ListObjectsV2", deny)
    with pytest.raises(DataError, match=r"S3 rejected the credentials for s3://edp-data/ed .*AccessDenied"):
        fetch_s3_prefix("s3://edp-data/ed", tmp_path, client=client)
