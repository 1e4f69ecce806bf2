"""download_release against a real local HTTP server serving a tarball built here."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from trainers.data.records import DataError
from trainers.data.release import download_release

HEADER = "conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags\n"


def official_csv(split: str, n_conv: int) -> bytes:
    """Rows in the release's format: one row per turn, commas written as `_comma_`."""
    rows = [HEADER]
    for c in range(n_conv):
        conv = f"hit:{c}_conv:{split}{c}"
        prompt = "I got a new job_comma_ finally"
        turns = ["I start my new job on monday_comma_ I am thrilled!", "Congrats_comma_ that is great news!",
                 "Thanks_comma_ it took a while."]
        for i, text in enumerate(turns):
            speaker = 1 if i % 2 == 0 else 2
            rows.append(f"{conv},{i + 1},excited,{prompt},{speaker},{text},5|5|5_2|2|5,\n")
    return "".join(rows).encode("utf-8")


def build_tarball(top: str = "empatheticdialogues/", splits=("train", "valid", "test")) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for split in splits:
            data = official_csv(split, {"train": 3, "valid": 2, "test": 1}[split])
            info = tarfile.TarInfo(f"{top}{split}.csv")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Server:
    """ThreadingHTTPServer on 127.0.0.1:0; `routes` maps path -> (status, body, extra headers)."""

    def __init__(self):
        self.routes: dict[str, tuple[int, bytes, dict]] = {}
        self.hits: list[str] = []
        self.delay = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits.append(self.path)
                status, body, headers = outer.routes.get(self.path, (404, b"not found", {}))
                time.sleep(outer.delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def serve(self, path: str, body: bytes, status: int = 200, **headers) -> str:
        self.routes[path] = (status, body, headers)
        return self.base + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_download_verifies_and_renames(server, tmp_path):
    body = build_tarball()
    url = server.serve("/ed/empatheticdialogues.tar.gz", body)
    seen = []
    path = download_release(url, tmp_path / "rel", sha256=hashlib.sha256(body).hexdigest(),
                            progress=lambda done, total: seen.append((done, total)))
    assert path == tmp_path / "rel" / "empatheticdialogues.tar.gz"
    assert path.read_bytes() == body
    assert leftovers(tmp_path / "rel") == ["empatheticdialogues.tar.gz"]  # no .part left
    assert seen[0] == (0, len(body)) and seen[-1] == (len(body), len(body))
    assert server.hits == ["/ed/empatheticdialogues.tar.gz"]


def test_downloaded_release_loads_as_official_csv(server, tmp_path):
    from trainers.data.sources import load_splits

    path = download_release(server.serve("/x/empatheticdialogues.tar.gz", build_tarball()), tmp_path)
    reports = load_splits(path)
    assert {s: len(r.conversations) for s, r in reports.items()} == {"train": 3, "valid": 2, "test": 1}
    conv = reports["train"].conversations[0]
    assert conv.situation == "I got a new job, finally"
    assert conv.utterances[1] == "Congrats, that is great news!"


def test_second_call_does_not_hit_server(server, tmp_path):
    body = build_tarball(top="")  # splits at the top level are accepted too
    url = server.serve("/empatheticdialogues.tar.gz", body)
    first = download_release(url, tmp_path)
    mtime = first.stat().st_mtime_ns
    second = download_release(url, tmp_path, sha256=hashlib.sha256(body).hexdigest())
    assert second == first and second.stat().st_mtime_ns == mtime
    assert len(server.hits) == 1


def test_corrupt_existing_copy_is_downloaded_again(server, tmp_path):
    body = build_tarball()
    url = server.serve("/empatheticdialogues.tar.gz", body)
    (tmp_path / "empatheticdialogues.tar.gz").write_bytes(body[: len(body) // 2])
    path = download_release(url, tmp_path)
    assert path.read_bytes() == body and len(server.hits) == 1


def test_sha256_mismatch_is_an_error_and_leaves_nothing(server, tmp_path):
    url = server.serve("/empatheticdialogues.tar.gz", build_tarball())
    with pytest.raises(DataError, match="sha256 mismatch") as err:
        download_release(url, tmp_path, sha256="0" * 64)
    assert url in str(err.value)
    assert leftovers(tmp_path) == []


def test_http_404_names_url_and_status(server, tmp_path):
    url = server.base + "/missing/empatheticdialogues.tar.gz"
    with pytest.raises(DataError) as err:
        download_release(url, tmp_path)
    assert url in str(err.value) and "404" in str(err.value)
    assert leftovers(tmp_path) == []


def test_non_tarball_body_is_rejected(server, tmp_path):
    url = server.serve("/empatheticdialogues.tar.gz", b"<html>maintenance page</html>")
    with pytest.raises(DataError, match="not a readable gzip tarball") as err:
        download_release(url, tmp_path)
    assert url in str(err.value)
    assert leftovers(tmp_path) == []


def test_tarball_without_all_splits_is_rejected(server, tmp_path):
    url = server.serve("/empatheticdialogues.tar.gz", build_tarball(splits=("train", "test")))
    with pytest.raises(DataError, match="valid.csv"):
        download_release(url, tmp_path)
    assert leftovers(tmp_path) == []


def test_truncated_body_is_an_error(server, tmp_path):
    body = build_tarball()
    url = server.serve("/empatheticdialogues.tar.gz", body[:100], **{"Content-Length": str(len(body))})
    with pytest.raises(DataError, match=url):
        download_release(url, tmp_path, timeout=5)
    assert leftovers(tmp_path) == []


def test_timeout_names_url(server, tmp_path):
    url = server.serve("/empatheticdialogues.tar.gz", build_tarball())
    server.delay = 1.0
    with pytest.raises(DataError, match="timed out") as err:
        download_release(url, tmp_path, timeout=0.2)
    assert url in str(err.value)


def test_unreachable_host_names_url(tmp_path):
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as s:
        port = s.server_address[1]  # bound then closed: nothing listens there afterwards
    url = f"http://127.0.0.1:{port}/empatheticdialogues.tar.gz"
    with pytest.raises(DataError, match="cannot download") as err:
        download_release(url, tmp_path, timeout=5)
    assert url in str(err.value)
