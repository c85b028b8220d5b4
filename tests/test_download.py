"""The download path against a real HTTP server on loopback that speaks the Hub's resolve protocol: it serves shards,
fails some requests, cuts one transfer off mid-file and sends one corrupt file. Retries must happen and no partial or
corrupt file may survive under a shard's name."""

import hashlib
import io
import os
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import prepare
import prepare_mlx_mamba_3
from conftest import synthetic_documents

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def parquet_bytes(seed):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": synthetic_documents(40, seed)}), buffer)
    return buffer.getvalue()


class FlakyHub:
    """Serves /datasets/<repo>/resolve/main/<file> with HEAD metadata and ranged GETs, misbehaving on purpose:
    `fail_first` files answer their first GET with 500, `cut_first` files drop the connection halfway through their
    first GET, `corrupt_first` files send garbage of the right size the first time, `always_fail` files always 503."""

    def __init__(self, files, fail_first=(), cut_first=(), corrupt_first=(), always_fail=()):
        self.files = files
        self.rules = dict(fail_first=set(fail_first), cut_first=set(cut_first), corrupt_first=set(corrupt_first),
                          always_fail=set(always_fail))
        self.gets = Counter()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def lookup(self):
                prefix = f"/datasets/{prepare.DATASET_REPO}/resolve/main/"
                name = self.path.split("?")[0][len(prefix):] if self.path.startswith(prefix) else None
                if name not in hub.files:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None, None
                return name, hub.files[name]

            def metadata_headers(self, body):
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
                self.send_header("Accept-Ranges", "bytes")

            def do_HEAD(self):
                name, body = self.lookup()
                if name is None:
                    return
                self.send_response(200)
                self.metadata_headers(body)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()

            def do_GET(self):
                name, body = self.lookup()
                if name is None:
                    return
                hub.gets[name] += 1
                first = hub.gets[name] == 1
                if name in hub.rules["always_fail"] or (first and name in hub.rules["fail_first"]):
                    self.send_response(503 if name in hub.rules["always_fail"] else 500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if first and name in hub.rules["corrupt_first"]:
                    body = b"\0" * len(body)
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.metadata_headers(body)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if first and name in hub.rules["cut_first"]:
                    self.wfile.write(body[start : start + len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the peer sees the body end early
                    return
                self.wfile.write(body[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def shard_files(directory):
    return sorted(f for f in os.listdir(directory) if f.startswith("shard_"))


def test_download_retries_resumes_and_verifies(data_dir):
    indices = [0, 1, 2, 3, prepare.VAL_SHARD]
    files = {prepare.SHARD_NAME.format(i): parquet_bytes(seed=i) for i in indices}
    names = [prepare.SHARD_NAME.format(i) for i in indices]
    with FlakyHub(files, fail_first=[names[1]], cut_first=[names[2]], corrupt_first=[names[3]]) as hub:
        fetched = prepare_mlx_mamba_3.download_shards(indices, workers=3, endpoint=hub.endpoint, backoff_seconds=0.01)
    assert fetched == len(indices)
    assert shard_files(data_dir) == sorted(names)
    for name in names:
        assert (data_dir / name).read_bytes() == files[name]  # byte for byte, including the resumed one
    assert hub.gets[names[0]] == 1
    assert hub.gets[names[1]] == 2 and hub.gets[names[2]] == 2 and hub.gets[names[3]] == 2  # each retried once

    # resumable and idempotent: finished shards are not fetched again
    with FlakyHub(files) as hub:
        assert prepare_mlx_mamba_3.download_shards(indices, workers=2, endpoint=hub.endpoint) == 0
    assert sum(hub.gets.values()) == 0


def test_download_that_keeps_failing_leaves_no_file_and_says_what_to_do(data_dir):
    files = {prepare.SHARD_NAME.format(i): parquet_bytes(seed=i) for i in (0, 1)}
    broken = prepare.SHARD_NAME.format(1)
    with FlakyHub(files, always_fail=[broken]) as hub:
        with pytest.raises(prepare.HarnessError, match=f"Download of {broken} failed after 3 attempts.*--data-dir"):
            prepare_mlx_mamba_3.download_shards([0, 1], workers=2, endpoint=hub.endpoint, attempts=3,
                                                backoff_seconds=0.01)
    assert hub.gets[broken] == 3
    assert shard_files(data_dir) == [prepare.SHARD_NAME.format(0)]  # the good shard is kept, nothing else
