"""Weights by name: the model-zoo table, verified / resumable / cached downloads, and the config keys that take names.

Every download here is from a local `http.server` (in a thread, counting its requests, with or without Range
support) or a file:// URL, of generated files, through a test-local table.
"""
import hashlib
import json
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from ovseg import model_zoo
from ovseg.utils.download import (
    ChecksumMismatchError,
    Download,
    UnverifiableDownloadError,
    WeightsUnavailableError,
    cached_or_download,
)
from tests.helpers import TINY_VIT, tiny_cfg

REPO = Path(__file__).resolve().parents[1]
DATA = bytes(range(256)) * 64  # 16 KiB, several chunks of the server's writes


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileServer:
    """A local HTTP server for `files` ({"/path": bytes}) that records every request (method, path, Range)."""

    def __init__(self, files, honour_range=True, linked_etag=None):
        self.files, self.honour_range, self.linked_etag = files, honour_range, linked_etag
        self.requests = []
        self.drop_after = None  # bytes sent before the next GET's connection is cut
        self.delay = 0.0  # seconds before a GET's body is sent
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _serve(self, head):
                rng = self.headers.get("Range")
                state.requests.append((self.command, self.path, rng))
                data = state.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and state.honour_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                if self.path.endswith(".html"):
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                if state.linked_etag:
                    self.send_header("X-Linked-Etag", f'"{state.linked_etag}"')
                self.end_headers()
                if head:
                    return
                if state.drop_after is not None:
                    body, state.drop_after = body[:state.drop_after], None
                time.sleep(state.delay)
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def gets(self):
        return [r for r in self.requests if r[0] == "GET"]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    made = []

    def make(files=None, **kw):
        s = FileServer(files if files is not None else {"/w.bin": DATA}, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    """Install a test-local table (written as a JSON file and read by the package's parser) and a temp cache."""
    monkeypatch.setenv("OVSEG_CACHE", str(tmp_path / "cache"))

    def install(*entries):
        table = tmp_path / "zoo.json"
        full = [dict(dict(what="test weights", filename="w.bin", size=None, sha256_source="test",
                          licence="Test-Licence-1.0", key="MODEL.CLIP.PRETRAINED", model_name=TINY_VIT,
                          configs=[], layout="open_clip"), **e) for e in entries]
        table.write_text(json.dumps({"entries": full}))
        monkeypatch.setattr(model_zoo, "_zoo", model_zoo.load_table(table))
        return {e["name"]: model_zoo.zoo_path(model_zoo.zoo_entry(e["name"])) for e in entries}

    return install


def quiet_fetch(name, **kw):
    return model_zoo.fetch(name, progress=False, **kw)


def test_download_verified_then_cache_hit_costs_no_request(server, zoo, capsys, monkeypatch):
    srv = server()
    path = zoo(dict(name="w", url=srv.url + "/w.bin", sha256=sha(DATA)))["w"]
    got = quiet_fetch("w")
    assert got == os.fspath(path) and path.read_bytes() == DATA
    assert not Path(got + ".part").exists()
    assert "Test-Licence-1.0" in capsys.readouterr().err  # the weights' licence is shown on download
    assert len(srv.gets()) == 1
    before = len(srv.requests)
    import ovseg.utils.download as download

    def no_hashing(path):
        raise AssertionError("a file verified at download is not hashed again on every use")

    monkeypatch.setattr(download, "sha256_of_file", no_hashing)
    assert quiet_fetch("w") == got
    assert len(srv.requests) == before  # cache hit: no request of any kind
    assert "Test-Licence-1.0" not in capsys.readouterr().err


def test_checksum_mismatch_is_refused_and_not_kept(server, zoo):
    srv = server()
    path = zoo(dict(name="w", url=srv.url + "/w.bin", sha256=sha(b"another file")))["w"]
    with pytest.raises(ChecksumMismatchError, match=sha(DATA)):
        quiet_fetch("w")
    assert not path.exists() and not Path(f"{path}.part").exists()


def test_interrupted_download_resumes_with_range(server, zoo):
    srv = server()
    half = len(DATA) // 2 + 3
    srv.drop_after = half
    path = zoo(dict(name="w", url=srv.url + "/w.bin", sha256=sha(DATA)))["w"]
    with pytest.raises(WeightsUnavailableError, match=r"\.part is kept"):
        quiet_fetch("w")
    assert not path.exists() and Path(f"{path}.part").read_bytes() == DATA[:half]
    quiet_fetch("w")
    assert srv.gets()[-1][2] == f"bytes={half}-"  # only the rest was asked for
    assert path.read_bytes() == DATA


def test_concurrent_downloads_of_one_file_do_not_collide(server, zoo):
    # two processes / threads sharing the cache (ranks of several machines, parallel jobs) used to write the same
    # <path>.part at once: the second one's rename found no .part (FileNotFoundError), or the bytes interleaved
    srv = server()
    srv.delay = 0.3  # both requests are in flight before either body arrives
    path = zoo(dict(name="w", url=srv.url + "/w.bin", sha256=sha(DATA)))["w"]
    results, errors = [], []

    def fetch():
        try:
            results.append(quiet_fetch("w"))
        except Exception as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [os.fspath(path)] * 2 and path.read_bytes() == DATA
    assert len(srv.gets()) == 1  # the second found the first's verified file


def test_partial_file_restarted_when_range_is_ignored(server, zoo):
    srv = server(honour_range=False)
    path = zoo(dict(name="w", url=srv.url + "/w.bin", sha256=sha(DATA)))["w"]
    path.parent.mkdir(parents=True)
    Path(f"{path}.part").write_bytes(b"\xff" * 100)  # appending the full body to this would fail the checksum
    quiet_fetch("w")
    assert srv.gets()[-1][2] == "bytes=100-"  # asked to resume, answered with the whole file
    assert path.read_bytes() == DATA


def test_partial_file_longer_than_the_servers_restarts(server, zoo):
    srv = server()
    path = zoo(dict(name="w", url=srv.url + "/w.bin", sha256=sha(DATA)))["w"]
    path.parent.mkdir(parents=True)
    Path(f"{path}.part").write_bytes(b"\xff" * (len(DATA) + 5))  # stale: the server answers 416
    quiet_fetch("w")
    assert [r[2] for r in srv.gets()] == [f"bytes={len(DATA) + 5}-", None]
    assert path.read_bytes() == DATA


def test_file_url_and_stale_partial(tmp_path, zoo):
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    path = zoo(dict(name="w", url=src.as_uri(), sha256=sha(DATA)))["w"]
    path.parent.mkdir(parents=True)
    Path(f"{path}.part").write_bytes(b"\xff" * 10)  # file:// has no Range: the download starts over
    quiet_fetch("w")
    assert path.read_bytes() == DATA


def test_hand_placed_file_is_checked_once_without_network(server, zoo):
    srv = server()
    path = zoo(dict(name="w", url=srv.url + "/w.bin", sha256=sha(DATA)))["w"]
    path.parent.mkdir(parents=True)
    path.write_bytes(DATA[:-1] + b"!")
    with pytest.raises(ChecksumMismatchError, match=re.escape(str(path))):
        quiet_fetch("w")
    assert path.exists()  # the user's own file is named, not deleted
    path.write_bytes(DATA)
    assert quiet_fetch("w") == os.fspath(path)
    assert srv.requests == []


def test_hand_placed_file_in_a_read_only_cache_is_used(server, zoo, monkeypatch):
    import ovseg.utils.download as download

    srv = server()
    path = zoo(dict(name="w", url=srv.url + "/w.bin", sha256=sha(DATA)))["w"]
    path.parent.mkdir(parents=True)
    path.write_bytes(DATA)
    # the marker cannot be written (as in a read-only folder; root ignores permission bits, so a missing folder)
    monkeypatch.setattr(download, "_marker", lambda p: os.path.join(p + ".no-such-dir", "verified.json"))
    assert quiet_fetch("w") == os.fspath(path)
    assert quiet_fetch("w") == os.fspath(path)  # verified again (no marker), still no network
    assert srv.requests == []


def test_offline_error_names_url_sha256_and_path(zoo):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w.bin"
    path = zoo(dict(name="w", url=url, sha256=sha(DATA)))["w"]
    with pytest.raises(WeightsUnavailableError) as info:
        quiet_fetch("w")
    msg = str(info.value)
    assert url in msg and sha(DATA) in msg and f"put it at {path}" in msg
    # train_net.py checks its inputs first: the same message as one UserError line, before any model is built
    from ovseg.engine import UserError, check_inputs

    with pytest.raises(UserError, match=re.escape(f"put it at {path}")):
        check_inputs(tiny_cfg(MODEL__CLIP__PRETRAINED="w"), eval_only=True)


def test_no_published_sha256_uses_the_servers_or_refuses(server, zoo):
    # the server states the file's sha256 (as the Hub's X-Linked-Etag): checked against it
    good = server(linked_etag=sha(DATA))
    bad = server(linked_etag=sha(b"x"))
    silent = server()
    paths = zoo(dict(name="good", url=good.url + "/w.bin", sha256=None),
                dict(name="bad", url=bad.url + "/w.bin", sha256=None),
                dict(name="silent", url=silent.url + "/w.bin", sha256=None))
    assert Path(quiet_fetch("good")).read_bytes() == DATA
    assert good.requests[0][0] == "HEAD"
    with pytest.raises(ChecksumMismatchError):
        quiet_fetch("bad")
    assert not paths["bad"].exists()
    # nothing to check against: refused before any byte is downloaded, unless allowed explicitly
    with pytest.raises(UnverifiableDownloadError, match="--allow-unverified"):
        quiet_fetch("silent")
    assert silent.gets() == [] and not paths["silent"].exists()
    # a web page (Google Drive's quota / confirmation page) is never taken for the file, allowed or not
    silent.files["/page.html"] = b"<html>Google Drive - quota exceeded</html>"
    page = Download(url=silent.url + "/page.html", path=os.fspath(paths["silent"]), sha256=None,
                              name="silent")
    with pytest.raises(WeightsUnavailableError, match="answered with a web page"):
        cached_or_download(page, allow_unverified=True, progress=False)
    assert not paths["silent"].exists()
    logged = []
    got = cached_or_download(
        Download(url=silent.url + "/w.bin", path=os.fspath(paths["silent"]), sha256=None, name="silent"),
        allow_unverified=True, progress=False, log=logged.append)
    assert Path(got).read_bytes() == DATA and sha(DATA) in logged[-1]


def test_zoo_name_through_clip_pretrained_loads_the_file(tmp_path, zoo, tiny_clip):
    from ovseg.modeling.clip_model import load_open_clip, load_open_clip_from_cfg

    ref = tiny_clip(seed=3)
    src = tmp_path / "tiny.pt"
    torch.save(ref.state_dict(), src)
    zoo(dict(name="tiny_clip", url=src.as_uri(), sha256=sha(src.read_bytes()), filename="tiny.pt"))
    model = load_open_clip_from_cfg(tiny_cfg(MODEL__CLIP__PRETRAINED="tiny_clip"))
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    from ovseg import Predictor

    p = Predictor(tiny_cfg(), weights="tiny_clip")  # a CLIP's weights go to MODEL.CLIP.PRETRAINED
    assert p.cfg.MODEL.CLIP.PRETRAINED == "tiny_clip" and not p.cfg.MODEL.WEIGHTS
    conv1 = p.model.state_dict()["backbone.tower.visual.conv1.weight"]
    assert torch.equal(conv1, ref.state_dict()["visual.conv1.weight"])
    with pytest.raises(ValueError, match="is ovseg-tiny-ViT-16 weights but MODEL.CLIP.MODEL_NAME"):
        load_open_clip("ovseg-tiny-EVA02-16", "tiny_clip")
    with pytest.raises(ValueError, match="nor a model-zoo name; names for MODEL.CLIP.PRETRAINED: tiny_clip"):
        load_open_clip(TINY_VIT, "tiny_clipp")


def test_zoo_name_as_model_weights_for_eval_and_predictor(tmp_path, zoo):
    from detectron2.modeling import build_model

    from ovseg import Predictor
    from ovseg.engine import UserError, check_inputs, load_eval_weights

    torch.manual_seed(1)
    ref = build_model(tiny_cfg())
    src = tmp_path / "model_final.pth"
    torch.save({"model": ref.state_dict()}, src)
    zoo(dict(name="tiny_model", url=src.as_uri(), sha256=sha(src.read_bytes()), key="MODEL.WEIGHTS",
             layout="ovseg", filename="model_final.pth"),
        dict(name="future", url=src.as_uri(), sha256=sha(src.read_bytes()), key="MODEL.WEIGHTS",
             layout="cat-seg", needs="a converter (coming)"))
    cfg = tiny_cfg(MODEL__WEIGHTS="tiny_model")
    check_inputs(cfg, eval_only=True)
    torch.manual_seed(2)
    model = build_model(cfg)
    load_eval_weights(cfg, model)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(UserError, match="names are read by --eval-only"):
        check_inputs(cfg, eval_only=False)
    with pytest.raises(UserError, match="cannot be loaded yet: it needs a converter"):
        check_inputs(tiny_cfg(MODEL__WEIGHTS="future"), eval_only=True)
    with pytest.raises(UserError, match="nor a model-zoo name; names for MODEL.WEIGHTS: tiny_model, future"):
        check_inputs(tiny_cfg(MODEL__WEIGHTS="tiny_modl"), eval_only=True)
    p = Predictor(tiny_cfg(), weights="tiny_model")
    assert p.cfg.MODEL.WEIGHTS == "tiny_model"
    assert all(torch.equal(p.model.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_licence_is_exposed_for_names_and_cached_files(tmp_path, zoo):
    src = tmp_path / "w.bin"
    src.write_bytes(DATA)
    path = zoo(dict(name="w", url=src.as_uri(), sha256=sha(DATA)))["w"]
    assert model_zoo.licence_of("w") == "Test-Licence-1.0"
    assert model_zoo.licence_of(os.fspath(path)) == "Test-Licence-1.0"
    assert model_zoo.licence_of(os.fspath(src)) is None
    cfg = tiny_cfg(MODEL__CLIP__PRETRAINED="w", MODEL__WEIGHTS=os.fspath(src))
    assert model_zoo.licences_of_cfg(cfg) == {"MODEL.CLIP.PRETRAINED": "Test-Licence-1.0"}


def test_package_table_entries_fit_their_configs():
    from ovseg.engine import load_config_file
    from ovseg.predictor import resolve_config

    table = model_zoo.load_table(model_zoo.TABLE_PATH)
    assert {"eva02_clip_b16", "clipself_eva02_b16_coco_patches", "clipself_eva02_l14_coco_patches", "catseg_b"} \
        <= set(table)
    for e in table.values():
        assert e.sha256 or "none published" in e.sha256_source, e.name
        assert e.url.startswith("https://"), e.name
        for name in e.configs:
            cfg = load_config_file(str(resolve_config(name)), warn=False)
            assert cfg.MODEL.CLIP.MODEL_NAME == e.model_name, (e.name, name)


def test_readme_table_is_the_package_table():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- model-zoo-table -->\n(.*?)\n<!-- /model-zoo-table -->", readme, re.S)
    assert block, "README.md lacks the model-zoo table markers"
    assert block.group(1) == model_zoo.markdown_table(), "README model-zoo table differs: paste " \
        "`python -m ovseg.model_zoo list`"


def test_cli_list_prints_the_table(capsys):
    assert model_zoo.main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == model_zoo.markdown_table()
    for name in model_zoo.zoo():
        assert f"`{name}`" in out
