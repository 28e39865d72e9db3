"""Data on demand (encore_fast.data): the registry's facts, local copies first, and downloads
that are streamed, checked, resumed and never left half-done, against a local HTTP server on
127.0.0.1 started here (never a remote host)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pickle
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from encore_fast import data
from encore_fast.cli import main
from encore_fast.data import REGISTRY, DataError, DataSet, locate, sha256_file
from encore_fast.eval.datasets import DatasetError, load_dataset
from encore_fast.paths import default_corpus

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EASYEDIT = {"case_id": 7, "prompt": "The capital of France is", "subject": "France",
            "target_new": "Rome", "ground_truth": "Paris",
            "rephrase_prompt": "France's capital is", "locality_prompt": "The capital of Spain is",
            "locality_ground_truth": "Madrid"}


# ----------------------------------------------------------------------------- a local server

@dataclass
class Server:
    """What the server holds and does: ``files`` by URL path, ``cut`` (path -> bytes sent
    before the connection is dropped, once), ``ignore_range`` (always answer 200), and the
    ``requests`` it saw as (path, Range header or None)."""

    port: int = 0
    files: dict[str, bytes] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _handler(state: Server) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 10  # (a stuck client cannot hold the server)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            wanted = self.headers.get("Range")
            state.requests.append((self.path, wanted))
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = 0
            if wanted and not state.ignore_range:
                start = int(wanted.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            cut = state.cut.pop(self.path, None)
            self.wfile.write(body[start:] if cut is None else body[start:start + cut])
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def server() -> Iterator[Server]:
    """An HTTP server on 127.0.0.1 (supports Range), stopped after the test."""
    state = Server()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def places(tmp_path, monkeypatch) -> Path:
    """An empty cache and an empty data folder (the workspace's is not used); the cache."""
    monkeypatch.setenv("ENCORE_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ENCORE_FAST_DATA", str(tmp_path / "data"))
    return tmp_path / "cache"


def register(monkeypatch, name: str, body: bytes, url: str, path: str | None = None,
             **kw) -> DataSet:
    kw.setdefault("size", len(body))
    kw.setdefault("sha256", hashlib.sha256(body).hexdigest())
    entry = DataSet(name=name, path=path or f"tests/{name}.bin", about="a test file", url=url,
                    licence="CC0", checksum="published: test", **kw)
    monkeypatch.setitem(REGISTRY, name, entry)
    return entry


def files_in(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- downloads

def test_download_is_checked_and_kept_once(server, monkeypatch, places):
    body = json.dumps([EASYEDIT]).encode()
    server.files["/cf.json"] = body
    register(monkeypatch, "tiny-cf", body, server.url("/cf.json"), path="counterfact/tiny.json")
    path = locate("tiny-cf")
    assert path == places / "data" / "counterfact" / "tiny.json"
    assert path.read_bytes() == body
    assert files_in(places) == [path]  # (no part file left)
    assert locate("tiny-cf") == path and len(server.requests) == 1  # once
    records = load_dataset("tiny-cf")  # the evaluation reads names through the same place
    assert [r.request.case_id for r in records] == [7] and len(server.requests) == 1


def test_interrupted_download_resumes_with_a_range_request(server, monkeypatch, places):
    body = random.Random(0).randbytes(300_000)
    server.files["/big.bin"] = body
    server.cut["/big.bin"] = 70_000
    entry = register(monkeypatch, "big", body, server.url("/big.bin"))
    path = locate("big", progress=False)
    assert server.requests == [("/big.bin", None), ("/big.bin", "bytes=70000-")]
    assert sha256_file(path) == entry.sha256 and files_in(places) == [path]


def test_partial_file_waits_for_the_next_call(server, monkeypatch, places):
    body = random.Random(1).randbytes(50_000)
    server.files["/p.bin"] = body
    server.cut["/p.bin"] = 20_000
    entry = register(monkeypatch, "part", body, server.url("/p.bin"))
    monkeypatch.setattr(data, "RETRIES", 0)
    with pytest.raises(DataError, match="20000 bytes received are kept") as info:
        locate("part")
    assert "\n" not in str(info.value)
    part = places / "data" / "tests" / "part.bin.part"
    assert part.stat().st_size == 20_000
    path = locate("part")
    assert server.requests[-1] == ("/p.bin", "bytes=20000-")
    assert sha256_file(path) == entry.sha256 and not part.exists()


def test_a_server_that_ignores_ranges_restarts_the_file(server, monkeypatch, places):
    body = random.Random(2).randbytes(40_000)
    server.files["/r.bin"] = body
    server.cut["/r.bin"] = 10_000
    server.ignore_range = True
    entry = register(monkeypatch, "norange", body, server.url("/r.bin"))
    path = locate("norange")
    assert server.requests[1] == ("/r.bin", "bytes=10000-")  # asked, answered 200
    assert path.read_bytes() == body and sha256_file(path) == entry.sha256


def test_a_refused_range_starts_over(server, monkeypatch, places):
    body = b"0123456789" * 100
    server.files["/whole.bin"] = body
    entry = register(monkeypatch, "whole", body, server.url("/whole.bin"), size=None)
    part = places / "data" / "tests" / "whole.bin.part"  # (all came; the rename did not)
    part.parent.mkdir(parents=True)
    part.write_bytes(body)
    path = locate("whole")
    assert server.requests == [("/whole.bin", "bytes=1000-"), ("/whole.bin", None)]
    assert sha256_file(path) == entry.sha256 and files_in(places) == [path]


def test_wrong_checksum_keeps_nothing(server, monkeypatch, places):
    server.files["/bad.json"] = b'{"tampered": true}'
    expected = hashlib.sha256(b"the real file").hexdigest()
    register(monkeypatch, "bad", b'{"tampered": true}', server.url("/bad.json"),
             sha256=expected)
    with pytest.raises(DataError) as info:
        locate("bad")
    got = hashlib.sha256(b'{"tampered": true}').hexdigest()
    assert f"expected SHA-256 {expected}" in str(info.value) and f"got {got}" in str(info.value)
    assert files_in(places) == []


def test_wrong_size_keeps_nothing(server, monkeypatch, places):
    server.files["/long.bin"] = b"x" * 120
    register(monkeypatch, "long", b"x" * 100, server.url("/long.bin"))
    with pytest.raises(DataError, match="100 bytes.*120 bytes"):
        locate("long")
    assert files_in(places) == []


def test_server_down_is_one_line_naming_file_variable_and_command(monkeypatch, places):
    register(monkeypatch, "down", b"abc", f"http://127.0.0.1:{closed_port()}/down.bin")
    with pytest.raises(DataError) as info:
        locate("down")
    line = str(info.value)
    assert "\n" not in line
    for word in ("tests/down.bin", "ENCORE_FAST_DATA", "encore-fast data fetch down"):
        assert word in line, (word, line)
    assert files_in(places) == []
    with pytest.raises(DatasetError, match="encore-fast data fetch down"):
        load_dataset("down")  # the evaluation's loader says the same


def test_next_mirror_is_tried_when_the_first_host_fails(server, monkeypatch):
    server.files["/m.bin"] = b"mirrored"
    register(monkeypatch, "mirrored", b"mirrored", server.url("/gone.bin"),
             mirrors=(server.url("/m.bin"),))
    assert locate("mirrored").read_bytes() == b"mirrored"
    assert [p for p, _ in server.requests] == ["/gone.bin", "/m.bin"]


def test_unknown_checksum_is_kept_with_a_warning(server, monkeypatch):
    server.files["/u.json"] = b"[1, 2]"
    register(monkeypatch, "unknown", b"", server.url("/u.json"), size=None, sha256=None)
    digest = hashlib.sha256(b"[1, 2]").hexdigest()
    with pytest.warns(UserWarning, match=f"unverified, its SHA-256 is {digest}"):
        assert locate("unknown").read_bytes() == b"[1, 2]"


def test_pickles_are_converted_and_checked(server, monkeypatch, places):
    records = [{"sentence": "fine é", "label": 1, "idx": 3}]
    raw = pickle.dumps(records)
    converted = json.dumps(records, ensure_ascii=False).encode()
    server.files["/t.pkl"] = raw
    register(monkeypatch, "task", raw, server.url("/t.pkl"), path="tasks/t.json",
             convert="pickle-json", derived_size=len(converted),
             derived_sha256=hashlib.sha256(converted).hexdigest())
    path = locate("tasks")  # (a folder stands for the files under it)
    assert path == places / "data" / "tasks" and (path / "t.json").read_bytes() == converted
    assert files_in(places) == [path / "t.json"]


def test_a_pickle_that_names_code_is_refused(server, monkeypatch, places):
    raw = pickle.dumps([Path("x")])  # (a class: unpickling would call it)
    server.files["/evil.pkl"] = raw
    register(monkeypatch, "evil", raw, server.url("/evil.pkl"), path="tasks/evil.json",
             convert="pickle-json")
    with pytest.raises(DataError, match="only plain data"):
        locate("evil")
    assert files_in(places) == []


# ----------------------------------------------------------------------------- local copies

def test_local_copy_is_used_without_any_download(tmp_path, monkeypatch, server):
    local = tmp_path / "data" / "tests" / "here.bin"
    local.parent.mkdir(parents=True)
    local.write_bytes(b"mine")
    register(monkeypatch, "here", b"published", server.url("/here.bin"))
    assert locate("here") == local and locate("here", download=False) == local
    assert data.where(REGISTRY["here"]) == ("local", local)
    assert server.requests == []


def test_a_folder_the_caller_gives_comes_first(tmp_path, monkeypatch):
    mine = tmp_path / "mine" / "tests" / "given.bin"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"given")
    register(monkeypatch, "given", b"given", f"http://127.0.0.1:{closed_port()}/x")
    assert locate("given", data_dir=tmp_path / "mine") == mine


def test_default_corpus_finds_the_cached_wikitext(places):
    assert default_corpus() is None
    cached = places / "data" / "wikitext-2" / "valid.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text(" = Title = \n")
    assert default_corpus() == cached


# ----------------------------------------------------------------------------- the CLI

def test_cli_data_list_path_fetch(server, monkeypatch, capsys, places):
    body = b"some data"
    server.files["/c.bin"] = body
    register(monkeypatch, "clidata", body, server.url("/c.bin"))
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in REGISTRY) and "not here" in out

    assert main(["data", "path", "clidata"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "encore-fast data fetch clidata" in err

    assert main(["data", "fetch", "clidata"]) == 0
    cached = places / "data" / "tests" / "clidata.bin"
    assert str(cached) in capsys.readouterr().out and cached.read_bytes() == body
    assert main(["data", "path", "clidata"]) == 0
    assert capsys.readouterr().out.strip() == str(cached)
    assert main(["data", "list"]) == 0
    assert f"cache: {cached}" in capsys.readouterr().out

    assert main(["data", "fetch", "nope"]) == 2
    assert "unknown data set 'nope'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the registry

def test_every_entry_says_where_from_licence_size_and_checksum():
    assert {"counterfact", "multi_counterfact", "counterfact-edit", "counterfact-train", "zsre",
            "zsre-train-1k", "known_1000", "wikitext-2-valid", "wikitext-2-test",
            "downstream-sst2", "downstream-mmlu"} <= set(REGISTRY)
    for name, e in REGISTRY.items():
        assert e.name == name and e.path and e.about and e.licence and e.checksum
        assert all(u.startswith("https://") for u in e.urls), name
        if e.sha256 is None or e.size is None:
            assert e.checksum.startswith("none:"), name  # (the reason)
        else:
            assert len(e.sha256) == 64 and int(e.sha256, 16) >= 0 and e.size > 0, name
        if e.convert:
            assert e.derived_size and e.derived_sha256 and len(e.derived_sha256) == 64, name


@pytest.mark.skipif(not SHARED.is_dir(), reason="no data folder beside the checkout")
def test_recorded_checksums_match_the_data_folder():
    checked = 0
    for e in REGISTRY.values():
        copy = SHARED / e.path
        if copy.is_file():
            assert os.path.getsize(copy) == e.local_size, e.name
            assert sha256_file(copy) == e.local_sha256, e.name
            checked += 1
    assert checked >= 10
    # (and the downstream pickles' conversion gives the data folder's bytes: see
    # test_pickles_are_converted_and_checked for the conversion itself)
