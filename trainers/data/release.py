"""The official EMPATHETIC-DIALOGUES release: `download_release` streams the tar.gz with urllib (no boto3), checks
its sha256 (optional) and that it holds train/valid/test.csv, and keeps a valid copy.

It is written to `<name>.part` in the destination directory and `os.replace`d into place, so a crash never leaves a
half-written file under the final name. Every failure is a `DataError` naming the URL and what went wrong.
trainers.data.sources reads the downloaded tarball (`edp data download`, then `--data <file>.tar.gz`).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from trainers.data.records import DataError

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/parlai/empatheticdialogues/empatheticdialogues.tar.gz"
DEFAULT_RELEASE_DIR = Path.home() / ".cache" / "edp" / "release"
RELEASE_SPLITS = ("train", "valid", "test")
RELEASE_TOP = "empatheticdialogues"
CHUNK = 1 << 20

Progress = Callable[[int, int | None], None]


def download_release(
    url: str = OFFICIAL_URL,
    dest_dir: str | Path = DEFAULT_RELEASE_DIR,
    *,
    sha256: str | None = None,
    timeout: float = 60,
    progress: Progress | None = None,
) -> Path:
    """Download the ED release tar.gz to dest_dir/<name> unless a valid copy is already there.

    Streams to <name>.part (calling `progress(bytes_done, total_or_None)`), checks the optional
    sha256 and that the file is a gzip tarball holding train/valid/test.csv, then renames it.
    """
    name = PurePosixPath(urllib.parse.urlparse(url).path).name or "empatheticdialogues.tar.gz"
    dest = Path(dest_dir) / name
    if dest.is_file():
        try:
            _check_release(dest, sha256, url, _file_sha256(dest))
            return dest
        except DataError:
            pass  # corrupt or stale copy: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(name + ".part")
    try:
        digest = _stream(url, part, timeout, progress)
        _check_release(part, sha256, url, digest)
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return dest


def _stream(url: str, part: Path, timeout: float, progress: Progress | None) -> str:
    """Copy the response body of `url` into `part`; returns its sha256 hex digest."""
    request = urllib.request.Request(url, headers={"User-Agent": "edp-data/1 (python urllib)"})
    digest, done = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, part.open("wb") as f:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if progress:
                progress(0, total)
            while chunk := response.read(CHUNK):
                f.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    except urllib.error.HTTPError as e:
        raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise DataError(f"download of {url} timed out after {timeout:g} s") from e
        raise DataError(f"cannot download {url}: {e.reason}") from e
    except TimeoutError as e:
        raise DataError(f"download of {url} timed out after {timeout:g} s ({done} bytes received)") from e
    except (OSError, http.client.HTTPException) as e:
        raise DataError(f"download of {url} failed after {done} bytes: {type(e).__name__}: {e}") from e
    if total is not None and done != total:
        raise DataError(f"download of {url} was cut short: {done} of {total} bytes")
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_release(path: Path, sha256: str | None, url: str, digest: str) -> None:
    """Raise DataError unless `path` matches `sha256` and is a gzip tarball with the three splits."""
    if sha256 and digest.lower() != sha256.strip().lower():
        raise DataError(f"{url}: sha256 mismatch: expected {sha256.strip().lower()}, got {digest}")
    try:
        with tarfile.open(path, "r:gz") as tar:
            names = {PurePosixPath(m.name).as_posix().removeprefix("./") for m in tar if m.isfile()}
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{url}: the downloaded file is not a readable gzip tarball ({e})") from e
    missing = [
        f"{split}.csv" for split in RELEASE_SPLITS
        if f"{split}.csv" not in names and f"{RELEASE_TOP}/{split}.csv" not in names
    ]
    if missing:
        raise DataError(
            f"{url}: the archive lacks {', '.join(missing)} (expected train/valid/test.csv, "
            f"optionally under {RELEASE_TOP}/)"
        )
