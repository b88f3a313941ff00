"""The downloader against a local HTTP server on 127.0.0.1: resume, checksums, tokens, cache and failures."""

import hashlib
import http.server
import random
import re
import socket
import threading

import pytest

import data

BODY = random.Random(0).randbytes(300_000)
SHA = hashlib.sha256(BODY).hexdigest()


class FileServer:
    """Serves `files` over HTTP/1.0 with Range support; knobs simulate misbehaving servers."""

    def __init__(self):
        self.files = {}  # URL path -> bytes
        self.cut_after = None  # send only this many body bytes (once), then close the connection
        self.wrong_body = False  # serve corrupted bytes of the right length
        self.ignore_range = False  # answer 200 with the whole file even to a Range request
        self.etag = None  # ETag header to advertise
        self.requests = []  # (path, request headers) of every GET
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, dict(self.headers)))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                if server.wrong_body:
                    body = bytes(b ^ 0xFF for b in body[:16]) + body[16:]
                start, status = 0, 200
                match = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if match and not server.ignore_range:
                    start, status = int(match.group(1)), 206
                    if start >= len(body):
                        self.send_error(416)
                        return
                payload = body[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                if server.etag:
                    self.send_header("ETag", server.etag)
                self.end_headers()
                if server.cut_after is not None:
                    payload, server.cut_after = payload[:server.cut_after], None
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        return Handler

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer()
    s.files["/w.bin"] = BODY
    yield s
    s.close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ("HF_TOKEN", "HF_ENDPOINT", "NANORESONATE_CACHE", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY",
                "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def test_full_download(server, tmp_path):
    dest = tmp_path / "sub" / "w.bin"
    assert data.download(server.url + "/w.bin", dest, sha256=SHA) == dest
    assert dest.read_bytes() == BODY and not (tmp_path / "sub" / "w.bin.part").exists()
    assert "Range" not in server.requests[0][1] and "Authorization" not in server.requests[0][1]
    assert data.download(server.url + "/w.bin", dest) == dest and len(server.requests) == 1  # exists: no request


def test_interrupted_transfer_resumes_with_a_range_request(server, tmp_path):
    dest, part = tmp_path / "w.bin", tmp_path / "w.bin.part"
    server.cut_after = 100_000
    with pytest.raises(data.DownloadError, match="resume") as err:
        data.download(server.url + "/w.bin", dest, chunk_size=10_000)
    got = part.stat().st_size  # what arrived, less at most the chunk being read when the connection broke
    assert str(dest) in str(err.value) and not dest.exists() and 0 < got <= 100_000
    assert part.read_bytes() == BODY[:got]
    data.download(server.url + "/w.bin", dest, sha256=SHA)
    assert server.requests[1][1]["Range"] == f"bytes={got}-"
    assert dest.read_bytes() == BODY and not part.exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    dest = tmp_path / "w.bin"
    (tmp_path / "w.bin.part").write_bytes(b"\0" * 5000)  # a stale partial file
    server.ignore_range = True
    data.download(server.url + "/w.bin", dest)
    assert server.requests[0][1]["Range"] == "bytes=5000-" and dest.read_bytes() == BODY


def test_part_longer_than_the_file_restarts(server, tmp_path):
    (tmp_path / "w.bin.part").write_bytes(b"\0" * (len(BODY) + 10))  # e.g. left by an older, larger version
    data.download(server.url + "/w.bin", tmp_path / "w.bin", sha256=SHA)
    assert [h.get("Range") for _, h in server.requests] == [f"bytes={len(BODY) + 10}-", None]
    assert (tmp_path / "w.bin").read_bytes() == BODY


@pytest.mark.parametrize("how", ["argument", "etag"])
def test_checksum_mismatch_leaves_nothing_behind(server, tmp_path, how):
    dest = tmp_path / "w.bin"
    server.wrong_body = True
    server.etag = f'"{SHA}"' if how == "etag" else None
    with pytest.raises(data.DownloadError, match="sha256") as err:
        data.download(server.url + "/w.bin", dest, sha256=SHA if how == "argument" else None)
    assert str(dest) in str(err.value) and server.url + "/w.bin" in str(err.value)
    assert not dest.exists() and not (tmp_path / "w.bin.part").exists()


def test_non_sha256_etag_is_not_taken_for_a_checksum(server, tmp_path):
    server.etag = '"' + hashlib.sha1(b"git blob").hexdigest() + '"'  # HF's ETag for small, non-LFS files
    assert data.download(server.url + "/w.bin", tmp_path / "w.bin").read_bytes() == BODY
    server.etag = f'W/"{SHA}"'
    assert data.download(server.url + "/w.bin", tmp_path / "w2.bin").read_bytes() == BODY


def test_hf_token_is_sent_as_bearer(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    data.download(server.url + "/w.bin", tmp_path / "a.bin")
    assert server.requests[-1][1]["Authorization"] == "Bearer hf_secret"
    data.download(server.url + "/w.bin", tmp_path / "b.bin", token="explicit")
    assert server.requests[-1][1]["Authorization"] == "Bearer explicit"


def test_hf_url_and_cache_dir(monkeypatch, tmp_path):
    assert data.hf_url("AndreasXi/Resonate", "Resonate_GRPO.pth") == \
        "https://huggingface.co/AndreasXi/Resonate/resolve/main/Resonate_GRPO.pth"
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local/")
    assert data.hf_url("o/n", "dir/a b.json", revision="refs/pr/1") == \
        "http://mirror.local/o/n/resolve/refs%2Fpr%2F1/dir/a%20b.json"
    assert data.cache_dir().parts[-2:] == (".cache", "nanoresonate")
    monkeypatch.setenv("NANORESONATE_CACHE", str(tmp_path / "c"))
    assert data.cache_dir() == tmp_path / "c"


def test_hf_file_prefers_local_dir_then_cache_then_downloads(server, tmp_path, monkeypatch):
    server.files["/owner/name/resolve/main/vocoder/w.bin"] = BODY
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("NANORESONATE_CACHE", str(tmp_path / "cache"))
    path = data.hf_file("owner/name", "vocoder/w.bin")
    assert path == tmp_path / "cache" / "owner--name" / "main" / "vocoder" / "w.bin" and path.read_bytes() == BODY
    assert data.hf_file("owner/name", "vocoder/w.bin") == path and len(server.requests) == 1  # cached
    local = tmp_path / "mine" / "vocoder" / "w.bin"
    local.parent.mkdir(parents=True)
    local.write_bytes(b"by hand")
    assert data.hf_file("owner/name", "vocoder/w.bin", local_dir=tmp_path / "mine") == local
    assert len(server.requests) == 1
    with pytest.raises(data.DownloadError, match="HTTP 404") as err:
        data.hf_file("owner/name", "absent.bin")
    assert "local_dir" in str(err.value)


def test_unreachable_server_raises_a_clear_error(tmp_path):
    with socket.socket() as s:  # find a free port, then close it so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, dest = f"http://127.0.0.1:{port}/Resonate_GRPO.pth", tmp_path / "Resonate_GRPO.pth"
    with pytest.raises(data.DownloadError) as err:
        data.download(url, dest, timeout=5)
    msg = str(err.value)
    assert url in msg and str(dest) in msg and "copy the file to" in msg and "refused" in msg.lower()
    assert not dest.exists() and not (tmp_path / "Resonate_GRPO.pth.part").exists()
