"""`audit fetch ham10000` against a local Dataverse stand-in on 127.0.0.1 (and nowhere else).

The server lists the release's files through the same API path as Dataverse and serves each
file with Range support. It can cut a response short (a dropped connection, resumed by the
client), ignore Range requests, and advertise a wrong checksum.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from audit.data import load_dataset
from audit.data.fetch import FetchError, default_data_dir, download, extract, fetch_ham10000

METADATA = (
    "lesion_id,image_id,dx,dx_type,age,sex,localization\n"
    "HAM_1,ISIC_1,mel,histo,50.0,male,back\n"
    "HAM_2,ISIC_2,nv,histo,40.0,female,face\n"
)


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), (90, 60, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (30, 20), 255).save(buffer, "PNG")
    return buffer.getvalue()


FILES = {
    1: ("HAM10000_images_part1.zip", _zip({"ISIC_1.jpg": _jpeg()})),
    2: ("HAM10000_images_part2.zip", _zip({"ISIC_2.jpg": _jpeg()})),
    3: (
        "HAM10000_segmentations_lesion_tschandl.zip",
        _zip({"HAM10000_segmentations_lesion_tschandl/ISIC_1_segmentation.png": _png()}),
    ),
    4: ("HAM10000_metadata.tab", METADATA.encode()),
}


class Release(BaseHTTPRequestHandler):
    cut_once: set[int] = set()  # file ids whose next response stops halfway
    ignore_range = False
    bad_md5: set[int] = set()
    requests: list[str] = []
    ranges: list[str] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        if "Range" in self.headers:
            type(self).ranges.append(self.headers["Range"])
        if self.path.startswith("/api/datasets/:persistentId/"):
            return self._send(200, json.dumps(self._listing()).encode(), "application/json")
        file_id = int(self.path.split("/api/access/datafile/")[1].split("?")[0])
        data = FILES[file_id][1]
        start = 0
        if "Range" in self.headers and not self.ignore_range:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if file_id in self.cut_once:
            type(self).cut_once.discard(file_id)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def _listing(self):
        files = []
        for file_id, (label, data) in FILES.items():
            md5 = "0" * 32 if file_id in self.bad_md5 else hashlib.md5(data).hexdigest()
            entry = {"id": file_id, "filename": label, "filesize": len(data) + 99, "md5": md5}
            if label.endswith(".tab"):
                entry.update(originalFileFormat="text/csv", originalFileSize=len(data))
            else:
                entry["filesize"] = len(data)
            files.append({"label": label, "dataFile": entry})
        return {"status": "OK", "data": {"latestVersion": {"files": files}}}

    def _send(self, code, body, kind):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    Release.cut_once, Release.ignore_range, Release.bad_md5, Release.requests, Release.ranges = (
        set(),
        False,
        set(),
        [],
        [],
    )
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Release)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_downloads_verifies_extracts_and_loads(tmp_path, server):
    dest = fetch_ham10000(tmp_path / "ham", base_url=server)
    assert (dest / "HAM10000_metadata.csv").read_text() == METADATA
    assert (dest / "HAM10000_images_part1" / "ISIC_1.jpg").is_file()
    assert (
        dest / "HAM10000_segmentations_lesion_tschandl" / "ISIC_1_segmentation.png"
    ).is_file()  # top folder flattened
    assert not list(dest.glob("*.part"))
    manifest = load_dataset("ham10000", dest).manifest
    assert manifest["image_id"].tolist() == ["ISIC_1", "ISIC_2"]
    assert manifest["mask_path"].notna().tolist() == [True, False]
    assert any("format=original" in path for path in Release.requests)


def test_second_run_downloads_nothing(tmp_path, server):
    fetch_ham10000(tmp_path / "ham", base_url=server)
    Release.requests = []
    fetch_ham10000(tmp_path / "ham", base_url=server)
    assert [p for p in Release.requests if "datafile" in p] == []


def test_truncated_transfer_is_resumed_with_range(tmp_path, server):
    Release.cut_once = {1, 4}
    progress = []
    fetch_ham10000(
        tmp_path / "ham", base_url=server, progress=lambda name, done, total: progress.append((name, done, total))
    )
    assert (tmp_path / "ham" / "HAM10000_images_part1.zip").read_bytes() == FILES[1][1]
    assert Release.ranges == [f"bytes={len(FILES[1][1]) // 2}-", f"bytes={len(FILES[4][1]) // 2}-"]
    assert progress[-1][1] == progress[-1][2]


def test_server_ignoring_range_restarts_cleanly(tmp_path, server):
    Release.cut_once, Release.ignore_range = {1}, True
    fetch_ham10000(tmp_path / "ham", base_url=server)
    assert (tmp_path / "ham" / "HAM10000_images_part1.zip").read_bytes() == FILES[1][1]


def test_bad_checksum_is_an_error_and_leaves_no_file(tmp_path, server):
    Release.bad_md5 = {2}
    with pytest.raises(FetchError, match="MD5 checksum mismatch"):
        fetch_ham10000(tmp_path / "ham", base_url=server)
    assert not (tmp_path / "ham" / "HAM10000_images_part2.zip").exists()
    assert not (tmp_path / "ham" / "HAM10000_images_part2.zip.part").exists()


def test_incomplete_download_says_how_far_it_got(tmp_path, server):
    with pytest.raises(FetchError, match="incomplete after 1 attempts"):
        download(f"{server}/api/access/datafile/1", tmp_path / "x.zip", len(FILES[1][1]) + 10, None, retries=0)


def test_unreachable_server(tmp_path):
    with pytest.raises(FetchError, match="cannot read the file list"):
        fetch_ham10000(tmp_path / "ham", base_url="http://127.0.0.1:9", timeout=2)


def test_zip_slip_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(_zip({"ok.txt": b"fine", "../escaped.txt": b"no"}))
    with pytest.raises(FetchError, match="outside the folder"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out").exists()


def test_default_location(monkeypatch, tmp_path):
    monkeypatch.setenv("AUDIT_DATA_DIR", str(tmp_path))
    assert default_data_dir("ham10000") == tmp_path / "ham10000"
    monkeypatch.delenv("AUDIT_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_dir("ham10000") == tmp_path / "cache" / "cam-audit" / "ham10000"


def test_missing_default_data_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("AUDIT_DATA_DIR", str(tmp_path))
    from audit.data import DatasetError

    with pytest.raises(DatasetError, match="audit fetch ham10000"):
        load_dataset("ham10000")
