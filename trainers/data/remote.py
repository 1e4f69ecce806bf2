"""The S3 mirror: `s3://bucket/prefix` data sources mirrored into a local cache, and the prepared-data cache shared
across nodes through S3. The only module of trainers/ that uses boto3.

`fetch_s3_prefix` lists a prefix, downloads only objects whose ETag changed since the last fetch
(a json manifest beside the files remembers key -> etag, size, local mtime) and returns the local path;
`publish_dir` / `fetch_dir` upload and download a prepared cache entry (trainers.data.prepare).
Each object is written to a temporary file in the destination directory and `os.replace`d into place, so a
crash never leaves a half-written file under the final name. Every failure is a `DataError`
naming the URI and what went wrong.

Why here and not in cluster/: `python -m trainers.train --data s3://...` and a Ray worker's `prepare` read S3
with plain PyTorch and no cluster import (trainers/ never imports cluster/). boto3 is imported only when an S3
client is made (`s3_client`), so nothing else in trainers/ loads it. The official release tarball (plain
HTTPS) is trainers.data.release.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from trainers.data.records import DataError

MANIFEST_NAME = ".s3-manifest.json"
CHUNK = 1 << 20

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
    "InvalidClientTokenId", "AuthorizationHeaderMalformed", "Forbidden", "403",
}
_BUCKET_CODES = {"NoSuchBucket"}


# ----------------------------------------------------------------------------- s3


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/prefix` into (bucket, prefix); the prefix may be empty."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise DataError(f"bad S3 URI {uri!r}: expected s3://bucket/prefix")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise DataError(
            f"bad S3 URI {uri!r}: bucket name {bucket!r} must be 3-63 lowercase letters, digits, '.' or '-'"
        )
    if ".." in PurePosixPath(prefix).parts:
        raise DataError(f"bad S3 URI {uri!r}: '..' is not allowed in the prefix")
    return bucket, prefix


def s3_client(endpoint_url: str | None = None, access_key: str | None = None, secret_key: str | None = None,
              timeout: float | None = None):
    """The project's one boto3 S3 client factory: path-style addressing (SeaweedFS, MinIO), few retries.

    With `endpoint_url=None` boto3 itself reads AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL; credentials are the
    keys given, else the usual boto3 chain (env, profile, instance role, ...). `timeout` bounds connect and read.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=timeout or 10,
        read_timeout=timeout or 60,
    )
    keys = {"aws_access_key_id": access_key, "aws_secret_access_key": secret_key} if access_key else {}
    region = {"region_name": "us-east-1"} if access_key else {}
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config, **keys, **region)


def fetch_s3_prefix(
    uri: str, cache_dir: str | Path, *, endpoint_url: str | None = None, client=None
) -> Path:
    """Mirror `uri` into cache_dir/<bucket>/<key...> and return the local directory.

    When `uri` names exactly one object the local file path is returned instead. Objects whose
    ETag and size match the manifest, and whose local file still has the recorded size and
    mtime, are not downloaded again; files of objects that disappeared from the prefix are removed.
    """
    bucket, prefix = parse_s3_uri(uri)
    base = Path(cache_dir) / bucket
    try:
        if client is None:
            client = s3_client(endpoint_url)
        listed = _list_objects(client, bucket, prefix)
        if prefix and not prefix.endswith("/") and prefix in listed:  # one object
            wanted = {prefix: listed[prefix]}
            result = base / prefix
            manifest_path = result.with_name(f".{result.name}{MANIFEST_NAME}")
        else:
            dir_prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
            wanted = {k: v for k, v in listed.items() if k.startswith(dir_prefix) and not k.endswith("/")}
            result = base / dir_prefix if dir_prefix else base
            manifest_path = result / MANIFEST_NAME
        if not wanted:
            raise DataError(
                f"no objects under {uri} (endpoint {_endpoint(client)}): check the bucket and prefix"
            )
        for key in wanted:
            _local_path(base, key, uri)  # reject unsafe keys before writing anything

        old = _read_manifest(manifest_path)
        new = {}
        for key, (etag, size) in sorted(wanted.items()):
            dest = _local_path(base, key, uri)
            if _cached(old.get(key), etag, size, dest):
                new[key] = old[key]
                continue
            got_etag, got_size = _download_object(client, bucket, key, dest)
            new[key] = {"etag": got_etag or etag, "size": got_size, "mtime_ns": dest.stat().st_mtime_ns}
        for key in set(old) - set(new):  # deleted remotely: drop the stale local copy
            _local_path(base, key, uri).unlink(missing_ok=True)
        _write_json_atomic(manifest_path, {"uri": uri, "objects": new})
        return result
    except DataError:
        raise
    except ValueError as e:  # e.g. a malformed endpoint URL, found while building the client
        raise DataError(f"cannot use S3 endpoint {endpoint_url!r} for {uri}: {e}") from e
    except Exception as e:  # botocore errors -> one clear DataError
        raise _s3_error(e, uri, bucket, client) from e


def publish_dir(local: Path, uri: str, *, endpoint_url: str | None = None, client=None,
                last: str = "manifest.json") -> int:
    """Upload every file under `local` to `uri/<relative path>`; the file named `last` goes up last, so a reader
    that sees it sees a complete copy. A copy already complete in S3 is left as it is. Returns the number of
    objects written."""
    bucket, prefix = parse_s3_uri(uri.rstrip("/"))
    files = sorted((p for p in Path(local).rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p)))
    try:
        client = client or s3_client(endpoint_url)
        if f"{prefix}/{last}" in _list_objects(client, bucket, f"{prefix}/{last}"):
            return 0
        for path in files:
            key = f"{prefix}/{path.relative_to(local).as_posix()}" if prefix else path.relative_to(local).as_posix()
            client.upload_file(str(path), bucket, key)
        return len(files)
    except Exception as e:  # botocore errors -> one clear DataError
        raise _s3_error(e, uri, bucket, client) from e


def fetch_dir(uri: str, dest: Path, *, endpoint_url: str | None = None, client=None,
              complete_when: str = "manifest.json") -> bool:
    """Download a directory published by `publish_dir` into `dest` (a temp dir beside it, then one rename).
    Returns False, and writes nothing, when `uri/<complete_when>` does not exist (not published, or not yet)."""
    bucket, prefix = parse_s3_uri(uri.rstrip("/"))
    dest = Path(dest)
    try:
        client = client or s3_client(endpoint_url)
        listed = _list_objects(client, bucket, f"{prefix}/")
        if f"{prefix}/{complete_when}" not in listed:
            return False
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.fetch-"))
        try:
            for key in listed:
                _download_object(client, bucket, key, _local_path(tmp, key[len(prefix) + 1:], uri))
            os.rename(tmp, dest)
        except OSError:
            if not dest.exists():
                raise
        finally:  # renamed away, or another process placed the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
        return True
    except (DataError, OSError):
        raise
    except Exception as e:
        raise _s3_error(e, uri, bucket, client) from e


def _list_objects(client, bucket: str, prefix: str) -> dict[str, tuple[str, int]]:
    """key -> (etag without quotes, size) for every object under `prefix` (all pages)."""
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            objects[obj["Key"]] = (str(obj.get("ETag", "")).strip('"'), int(obj["Size"]))
    return objects


def _cached(entry: dict | None, etag: str, size: int, dest: Path) -> bool:
    """Same ETag and size as listed, and the local file untouched since we wrote it."""
    if not entry or entry.get("etag") != etag or entry.get("size") != size:
        return False
    try:
        st = dest.stat()
    except OSError:
        return False
    return st.st_size == size and st.st_mtime_ns == entry.get("mtime_ns")


def _local_path(base: Path, key: str, uri: str) -> Path:
    parts = PurePosixPath(key).parts
    if not parts or key.startswith("/") or any(p in ("..", ".") for p in parts):
        raise DataError(f"{uri}: object key {key!r} cannot be stored as a local file")
    return base.joinpath(*parts)


def _download_object(client, bucket: str, key: str, dest: Path) -> tuple[str, int]:
    """GetObject into a temp file beside `dest`, then rename; returns (etag, size) of what was read."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    response = client.get_object(Bucket=bucket, Key=key)
    size = 0
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in response["Body"].iter_chunks(CHUNK):
                f.write(chunk)
                size += len(chunk)
        expected = response.get("ContentLength")
        if expected is not None and size != expected:
            raise DataError(f"s3://{bucket}/{key}: got {size} bytes, expected {expected} (connection cut?)")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(response.get("ETag", "")).strip('"'), size


def _read_manifest(path: Path) -> dict[str, dict]:
    try:
        objects = json.loads(path.read_text(encoding="utf-8")).get("objects", {})
        return objects if isinstance(objects, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}  # missing or corrupt: everything is downloaded again


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _endpoint(client) -> str:
    return str(getattr(getattr(client, "meta", None), "endpoint_url", None) or "<default AWS endpoint>")


def _masked_access_key(client) -> str:
    """First 4 characters of the access key in use, never the rest."""
    key = None
    try:
        key = client._request_signer._credentials.access_key  # what the client actually signs with
    except AttributeError:
        key = os.environ.get("AWS_ACCESS_KEY_ID")
    if not key:
        return "<none>"
    return f"{key[:4]}… masked" if len(key) > 4 else "… masked"


def _s3_error(exc: Exception, uri: str, bucket: str, client) -> DataError:
    from botocore import exceptions as bx

    endpoint = _endpoint(client)
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _CREDENTIAL_CODES:
            return DataError(
                f"S3 rejected the credentials for {uri} at {endpoint} ({code}, HTTP {status}; "
                f"AWS_ACCESS_KEY_ID={_masked_access_key(client)}): check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and that this key may read the bucket"
            )
        if code in _BUCKET_CODES:
            return DataError(f"S3 bucket {bucket!r} does not exist at {endpoint} (reading {uri})")
        return DataError(f"S3 request for {uri} at {endpoint} failed: {code} {err.get('Message', '')} "
                         f"(HTTP {status})")
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return DataError(
            f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        )
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                        bx.ConnectionClosedError)):
        return DataError(
            f"cannot reach the S3 endpoint {endpoint} for {uri} ({exc}): check --endpoint-url, "
            "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and that the server is running"
        )
    if isinstance(exc, OSError):
        return DataError(f"cannot write the local copy of {uri}: {exc}")
    return DataError(f"S3 access to {uri} at {endpoint} failed: {type(exc).__name__}: {exc}")
