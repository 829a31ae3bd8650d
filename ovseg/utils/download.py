"""Verified, resumable downloads of weights files into a cache folder.

One rule for every file: it appears at its final path only after its sha256 matched (written to `<path>.part`
first, renamed when complete), an interrupted download resumes with an HTTP Range request (and starts over when
the server ignores Range), a file already in the cache costs no network at all, and processes sharing the cache
download a file one at a time (`<path>.lock`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException, IncompleteRead
from typing import Callable, Optional

__all__ = ["ChecksumMismatchError", "Download", "UnverifiableDownloadError", "WeightsUnavailableError",
           "cached_or_download", "server_sha256", "sha256_of_file"]

_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
TIMEOUT_S = 30.0


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be downloaded (offline?) or found."""


class ChecksumMismatchError(ValueError):
    """A downloaded (or hand-placed) file's sha256 differs from the expected one; the file was not kept."""


class UnverifiableDownloadError(WeightsUnavailableError):
    """No sha256 is known for a file (none published, none from the server) and the caller did not allow that."""


@dataclass(frozen=True)
class Download:
    """What to fetch and how to name it in messages.

    Attributes:
        url: http(s):// or file:// address.
        path: the file's final place in the cache.
        sha256: the expected digest (lower-case hex), or None when none is published.
        name: how messages name the file (e.g. the model-zoo name).
        licence: shown when the file is downloaded.
    """

    url: str
    path: str
    sha256: Optional[str]
    name: str
    licence: str = ""


def sha256_of_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _marker(path: str) -> str:
    return path + ".verified.json"


def _write_marker(path: str, digest: str) -> None:
    # lets a later cache hit skip re-hashing: the size and digest of the file as verified
    try:
        with open(_marker(path), "w") as f:
            json.dump({"sha256": digest, "size": os.path.getsize(path)}, f)
    except OSError:  # a read-only cache (a file put there by hand): the file is verified, just hashed again next time
        pass


def _marker_matches(path: str, expected: Optional[str]) -> bool:
    try:
        with open(_marker(path)) as f:
            mark = json.load(f)
    except (OSError, ValueError):
        return False
    return (mark.get("size") == os.path.getsize(path)
            and (expected is None or mark.get("sha256") == expected))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # the 3xx itself is the answer: the Hub puts the file's sha256 on it


def server_sha256(url: str, timeout: float = TIMEOUT_S) -> Optional[str]:
    """The sha256 the server states for `url`, or None: the Hugging Face Hub answers a HEAD of a `resolve/` URL of
    an LFS file with `X-Linked-Etag` (or `ETag`) = the file's sha256 (on the redirect, so it is not followed)."""
    if not url.startswith(("http://", "https://")):
        return None
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "ovseg"})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(req, timeout=timeout) as resp:
            headers = resp.headers
    except urllib.error.HTTPError as e:  # 3xx arrive here since they are not followed
        headers = e.headers
    for key in ("X-Linked-Etag", "ETag"):
        value = (headers.get(key) or "").removeprefix("W/").strip('"').lower()
        if _SHA256.match(value):
            return value
    return None


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": "ovseg"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _resumed(resp, offset: int) -> bool:
    """Whether the server honoured `Range: bytes=offset-` (206 with a Content-Range starting at offset)."""
    return (getattr(resp, "status", None) == 206
            and (resp.headers.get("Content-Range") or "").startswith(f"bytes {offset}-"))


def _fetch(dl: Download, expected: Optional[str], progress: bool, timeout: float,
           log: Callable[[str], None]) -> str:
    """Download into `<path>.part` (resuming it), check the digest, rename. Returns the digest."""
    from tqdm import tqdm

    part = dl.path + ".part"
    offset = os.path.getsize(part) if os.path.isfile(part) else 0
    try:
        resp = _open(dl.url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        offset = 0  # the partial file does not fit the server's file: start over
        resp = _open(dl.url, 0, timeout)
    with resp:
        if (resp.headers.get("Content-Type") or "").startswith("text/html"):
            # file hosts (Google Drive) answer a quota, sign-in or confirmation page with 200: not the file
            raise WeightsUnavailableError(
                f"{dl.url} answered with a web page, not {dl.name}'s file (a quota, sign-in or confirmation page?). "
                f"Download it in a browser and put it at {dl.path}")
        if dl.licence:  # shown once the server answers, before the bytes come
            log(f"{dl.name}: licence: {dl.licence}")
        if offset and not _resumed(resp, offset):
            offset = 0  # Range ignored (200, or file://): the body is the whole file
        h = hashlib.sha256()
        if offset:
            with open(part, "rb") as f:
                for chunk in iter(lambda: f.read(_CHUNK), b""):
                    h.update(chunk)
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        with open(part, "ab" if offset else "wb") as f, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=dl.name, disable=not progress) as bar:
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                f.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
            received = f.tell()
    if total is not None and received < total:
        # http.client ends a cut-off body quietly: short of Content-Length is an interruption, kept for resuming
        raise IncompleteRead(b"", total - received)
    digest = h.hexdigest()
    if expected is not None and digest != expected:
        os.remove(part)
        raise ChecksumMismatchError(
            f"{dl.name}: the file from {dl.url} has sha256 {digest}, expected {expected}; it was deleted, not "
            "used (a corrupted transfer, or the file changed on the server)")
    os.replace(part, dl.path)  # atomic: the final name only ever holds a complete, checked file
    _write_marker(dl.path, digest)
    return digest


@contextmanager
def _exclusive(path: str):
    """Hold `<path>.lock` (an flock): one download of a file at a time among the threads and processes that share
    the cache (they would write the same `.part`). No lock where the platform or the folder allows none."""
    try:
        import fcntl
        f = open(path + ".lock", "a")
    except (ImportError, OSError):
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _unavailable(dl: Download, expected: Optional[str], why: str) -> WeightsUnavailableError:
    sha = expected or "not published (compare with the source's own listing)"
    return WeightsUnavailableError(
        f"could not download {dl.name} from {dl.url} ({why}). Offline? Download it elsewhere, check "
        f"sha256 {sha}, and put it at {dl.path} (it is then used without network)")


def cached_or_download(dl: Download, *, allow_unverified: bool = False, progress: bool = True,
                       timeout: float = TIMEOUT_S, log: Callable[[str], None] = None) -> str:
    """The local path of `dl`: the cached file (no network), else downloaded, verified and cached.

    Args:
        dl: what to fetch and where it goes.
        allow_unverified: accept a file for which neither `dl.sha256` nor the server states a sha256 (its digest
            is then printed and recorded). Off: such a download is refused.
        progress: show a tqdm progress bar.
        timeout: seconds per network operation.
        log: where the licence and notes are written (default: stderr).
    Returns:
        `dl.path`, holding a complete file whose sha256 matched.
    Raises:
        WeightsUnavailableError: the server cannot be reached (message: URL, sha256, where to put the file).
        ChecksumMismatchError: the file's sha256 is wrong (a downloaded file is deleted, a hand-placed one named).
        UnverifiableDownloadError: no sha256 to check against and `allow_unverified` is False.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    expected = dl.sha256.lower() if dl.sha256 else None
    if os.path.isfile(dl.path) and _marker_matches(dl.path, expected):
        return dl.path  # the common case: no lock, no hashing, no network
    os.makedirs(os.path.dirname(os.path.abspath(dl.path)), exist_ok=True)
    with _exclusive(dl.path):  # another process may be downloading it: wait, then find its file
        return _check_or_fetch(dl, expected, allow_unverified, progress, timeout, log)


def _check_or_fetch(dl: Download, expected: Optional[str], allow_unverified: bool, progress: bool, timeout: float,
                    log: Callable[[str], None]) -> str:
    if os.path.isfile(dl.path):
        if _marker_matches(dl.path, expected):
            return dl.path
        digest = sha256_of_file(dl.path)  # placed by hand: checked once, then remembered
        if expected is not None and digest != expected:
            raise ChecksumMismatchError(
                f"{dl.name}: {dl.path} has sha256 {digest}, expected {expected}: replace it with the file from "
                f"{dl.url}")
        if expected is None:
            log(f"{dl.name}: no published sha256; using {dl.path} as found (sha256 {digest})")
        _write_marker(dl.path, digest)
        return dl.path
    try:
        if expected is None:
            expected = server_sha256(dl.url, timeout)
            if expected is None and not allow_unverified:
                raise UnverifiableDownloadError(
                    f"{dl.name}: no sha256 is published for {dl.url} and the server states none, so the download "
                    "could not be verified and was not started. Download it yourself and put it at "
                    f"{dl.path}, or allow it once: python -m ovseg.model_zoo download {dl.name} "
                    "--allow-unverified")
        digest = _fetch(dl, expected, progress, timeout, log)
    except (urllib.error.URLError, HTTPException, socket.timeout, ConnectionError, TimeoutError) as e:
        why = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if os.path.isfile(dl.path + ".part"):
            why += f"; the partial file {dl.path}.part is kept and resumed on the next try"
        raise _unavailable(dl, expected, why) from e
    if expected is None:
        log(f"{dl.name}: downloaded WITHOUT a checksum to compare with; its sha256 is {digest}")
    return dl.path
