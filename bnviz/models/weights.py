"""torchvision weights in the torch hub cache: where each file lives, downloading it with
progress and a hash check, checking a cached file against the hash in its name, and saying
where a model's weights would come from."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import urlparse

import torch

from ..errors import BnvizError, WeightsUnavailableError
from .registry import DEFAULT_MODEL, TORCHVISION_MODELS, _resolve_name
from .seams import seam

#: Connect (and per-read) timeout for downloads: long enough for a slow link, short enough that
#: an offline machine gets its fix-it message quickly instead of hanging the dashboard.
DOWNLOAD_TIMEOUT_S = 5.0
#: Timeout of the reachability probe behind weights_status(), which runs while a UI renders.
PROBE_TIMEOUT_S = 3.0
_CHUNK_BYTES = 1 << 16
_USER_AGENT = "bnviz (model weights download)"

#: Same rule as torch.hub's HASH_REGEX: "resnet18-f37072fd.pth" promises sha256 "f37072fd...".
_HASH_PREFIX_RE = re.compile(r"-([a-f0-9]+)\.")

ProgressCallback = Callable[[int, int], None]

#: sha256 of files already hashed, by (path, size, mtime, inode): a cached weights file is
#: hashed once per process (hundreds of MB for the large models), again only when replaced.
_DIGESTS: dict[tuple[str, int, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()
_DIGESTS_KEPT = 64


@dataclass(frozen=True)
class _WeightsFile:
    enum: Any  # torchvision WeightsEnum member
    url: str
    filename: str
    cache_dir: str

    @property
    def path(self) -> str:
        return os.path.join(self.cache_dir, self.filename)


def _weights_enum(name: str) -> Any:
    import torchvision

    return torchvision.models.get_model_weights(name).DEFAULT


def _weights_file(name: str) -> _WeightsFile:
    """Where torchvision keeps ``name``'s default weights; resolved on every call because
    ``torch.hub.get_dir()`` re-reads ``$TORCH_HOME`` each time (users and tests change it)."""
    enum = _weights_enum(name)
    filename = os.path.basename(urlparse(enum.url).path)
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    return _WeightsFile(enum=enum, url=enum.url, filename=filename, cache_dir=cache_dir)


def _hash_prefix(filename: str) -> str | None:
    match = _HASH_PREFIX_RE.search(filename)
    return match.group(1) if match else None


def _file_key(path: str) -> tuple[str, int, int, int]:
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino


def _remember_digest(key: tuple[str, int, int, int], digest: str) -> None:
    with _DIGESTS_LOCK:
        _DIGESTS.pop(key, None)
        while len(_DIGESTS) >= _DIGESTS_KEPT:
            _DIGESTS.pop(next(iter(_DIGESTS)))
        _DIGESTS[key] = digest


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of the file at ``path``, computed once per version of the file."""
    path = os.fspath(path)
    key = _file_key(path)
    with _DIGESTS_LOCK:
        digest = _DIGESTS.get(key)
    if digest is None:
        sha = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                sha.update(chunk)
        digest = sha.hexdigest()
        _remember_digest(key, digest)
    return digest


def _cache_problem(info: _WeightsFile) -> str | None:
    """None when the cached file is the published one, else why not (a phrase).

    torchvision's file names carry the start of the file's sha256 (``resnet18-f37072fd.pth``),
    and torch.hub checks it only while downloading: any file later put under that name, say a
    random init saved by a script, would otherwise be called pretrained.
    """
    promise = seam("_hash_prefix")(info.filename)
    if not promise:
        return None
    try:
        digest = file_sha256(info.path)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    if digest.startswith(promise):
        return None
    return f"its sha256 starts with {digest[: len(promise)]}, but the file name promises {promise}"


def _manual_fix(filename: str, url: str, cache_dir: str) -> str:
    return (
        f"download {url} on a machine with internet access and copy it to "
        f"{os.path.join(cache_dir, filename)} (set TORCH_HOME to use another cache folder), "
        "or use weights=None (CLI: --weights random) for an explicitly random-initialised model."
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"network error: {exc.reason}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def download_weights(
    url: str,
    dest: str | os.PathLike[str],
    *,
    hash_prefix: str | None = None,
    progress: ProgressCallback | None = None,
    model_name: str | None = None,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    replacing: str | None = None,
) -> str:
    """Download ``url`` to ``dest`` atomically, verifying a sha256 prefix; return ``dest``.

    Bytes stream into a temporary file in the destination folder which is ``os.replace``-d
    into place only once complete and verified, so an interrupted or corrupt download never
    leaves a file that a later run would mistake for cached weights (torch.hub does not
    re-verify cached files). ``progress(bytes_done, total_bytes)`` is called after every chunk
    so a UI can draw a bar; ``total_bytes`` is 0 when the server does not send a length.

    Every failure (offline, HTTP error, truncated transfer, hash mismatch, unwritable cache)
    raises :class:`WeightsUnavailableError` naming the file, the URL and the folder, with
    ``.url`` / ``.filename`` / ``.cache_dir`` set so a UI can offer the manual route.
    ``replacing``: why the file already at ``dest`` is not used (its messages say so).
    """
    dest = os.path.abspath(os.fspath(dest))
    cache_dir, filename = os.path.split(dest)
    what = f"the pretrained {model_name} weights" if model_name else "the weights file"
    where = {"url": url, "filename": filename, "cache_dir": cache_dir}
    fix = _manual_fix(filename, url, cache_dir)

    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".partial", dir=cache_dir)
    except OSError as exc:
        raise WeightsUnavailableError(
            f"Cannot write {what} ({filename}) into the cache folder {cache_dir}: {exc}.",
            "make that folder writable or point TORCH_HOME at a writable folder, or use "
            "weights=None (CLI: --weights random) for an explicitly random-initialised model.",
            **where,
        ) from exc

    keep = False
    try:
        sha = hashlib.sha256()
        done = total = 0
        with os.fdopen(fd, "wb") as out:
            try:
                request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
                with seam("_urlopen")(request, timeout=timeout) as response:
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else 0
                    while chunk := response.read(_CHUNK_BYTES):
                        out.write(chunk)
                        sha.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                # URLError/HTTPError/TimeoutError/ConnectionError are all OSErrors;
                # IncompleteRead is an HTTPException; ValueError covers a malformed URL.
                if replacing:
                    raise WeightsUnavailableError(
                        f"The cached file {dest} is not the published {filename} "
                        f"({replacing}), so bnviz does not use it as {what}; downloading the "
                        f"published file from {url} failed ({_reason(exc)}).",
                        f"delete it (bnviz downloads the published file again when online), "
                        f"or {fix}",
                        **where,
                    ) from exc
                raise WeightsUnavailableError(
                    f"{what[0].upper()}{what[1:]} ({filename}) are not in the cache folder "
                    f"{cache_dir} and downloading them from {url} failed ({_reason(exc)}).",
                    fix,
                    **where,
                ) from exc
        if total and done != total:
            raise WeightsUnavailableError(
                f"Downloading {filename} from {url} stopped after {done} of {total} bytes.",
                f"retry; if it keeps failing, {fix}",
                **where,
            )
        digest = sha.hexdigest()
        if hash_prefix and not digest.startswith(hash_prefix):
            raise WeightsUnavailableError(
                f"The download of {filename} from {url} is corrupt: its sha256 starts with "
                f"{digest[: len(hash_prefix)]} but the file name promises {hash_prefix}. "
                f"Nothing was saved in {cache_dir}.",
                f"retry; if it keeps failing, {fix}",
                **where,
            )
        os.replace(tmp, dest)
        keep = True
        _remember_digest(_file_key(dest), digest)
        return dest
    finally:
        if not keep:
            try:
                os.remove(tmp)
            except OSError:
                pass


def fetch_weights(name: str, *, progress: ProgressCallback | None = None) -> str:
    """Make sure the pretrained weights of torchvision model ``name`` are in the torch hub
    cache, downloading them if needed (``progress(done, total)`` per chunk); returns the
    file's path. Builds no model: the dashboard shows the download's progress with this
    and then loads the model once, from the cache.

    A cached file whose sha256 does not start with the prefix in its name is not the
    published one: it is downloaded again, and replaced only once the new copy is complete
    and verified.

    Raises :class:`~bnviz.errors.WeightsUnavailableError` (naming the file, the URL and
    the cache folder) when the file is neither cached nor downloadable.
    """
    key = _resolve_name(name)
    if key.startswith("timm:"):  # the Hugging Face hub cache, timm's
        from .timm_zoo import fetch_timm_weights

        return fetch_timm_weights(key, progress=progress)
    if key not in TORCHVISION_MODELS:
        raise BnvizError(f"{key} ships its weights with bnviz: there is nothing to fetch.",
                         f"fetch one of: {', '.join(TORCHVISION_MODELS)}.")
    info = _weights_file(key)
    problem = _cache_problem(info) if os.path.isfile(info.path) else None
    if problem is None and os.path.isfile(info.path):
        return info.path
    download_weights(info.url, info.path, hash_prefix=seam("_hash_prefix")(info.filename),
                     progress=progress, model_name=key, replacing=problem)
    return info.path


@cache
def _host_reachable(origin: str) -> bool:
    """Whether ``origin`` (``scheme://host``) answers at all; cached for the process so a UI
    listing a dozen models probes the network once, not once per model per rerun."""
    request = urllib.request.Request(
        origin + "/", method="HEAD", headers={"User-Agent": _USER_AGENT}
    )
    try:
        with seam("_urlopen")(request, timeout=PROBE_TIMEOUT_S):
            return True
    except urllib.error.HTTPError:
        return True  # an HTTP error status still proves the server is reachable
    except (OSError, http.client.HTTPException, ValueError):
        return False


def weights_status(name: str, *, check_network: bool = True) -> str:
    """Where ``name``'s pretrained weights would come from, without loading anything.

    Returns "bundled" (ships with a Python package), "cached" (already in the torch hub
    cache), "downloadable" (not cached, download server reachable), "unavailable offline"
    (not cached, server unreachable) or, with ``check_network=False`` (no probe, for
    instant UI rendering), "not cached". "none" means a model without pretrained weights
    (some timm models); no registry model is like that today. For timm models "cached"
    means the Hugging Face hub cache.
    """
    key = _resolve_name(name)
    if key == DEFAULT_MODEL:
        return "bundled"
    if key.startswith("timm:"):
        from .timm_zoo import timm_weights_status

        return timm_weights_status(key, check_network=check_network)
    try:
        info = _weights_file(key)
    except (ValueError, KeyError, AttributeError):
        return "none"
    if os.path.isfile(info.path):
        return "cached"
    if not check_network:
        return "not cached"
    parsed = urlparse(info.url)
    reachable = seam("_host_reachable")(f"{parsed.scheme}://{parsed.netloc}")
    return "downloadable" if reachable else "unavailable offline"
