"""Content-addressed on-disk cache of embeddings (encoding is the expensive step: cache it, never trust it blindly).

A key is ``sha256(namespace digest, kind, content)`` where the *namespace* describes everything that changes an
embedding besides the item itself (model id, revision, preprocessing, decoding — see
:data:`kplib.data.DECODE_DESCRIPTION`) and the *content* is the image file's **bytes** (an edited image gets a new
key, a renamed or moved one keeps its key) or the exact prompt text.

Storage: one small file per entry, ``<cache_dir>/<namespace-slug>-<digest12>/<key[:2]>/<key>.kple``, holding a
JSON header (key, dtype, shape, sha256 of the payload) followed by the float32 payload exactly as computed. Reads
verify magic, key, shape and checksum: a truncated or corrupted entry is logged, counted in ``stats.corrupt``,
deleted and treated as a miss (it gets recomputed), never returned. Writes go to a temporary file in the same
folder followed by ``os.replace``, so a reader never sees half an entry.

If the cache folder cannot be created, or a write fails (read-only folder, disk full), a :class:`CacheWarning`
says that caching is off and the run continues without it: the user still gets results, only slower next time.
Pass ``strict=True`` to get a :class:`kplib.errors.CacheError` instead.

Usage (encoders / experiment)::

    from kplib.cache import EmbeddingCache
    cache = EmbeddingCache({"model": identity.name, "revision": identity.revision,
                            "preprocessing": processor_description, "decode": data.DECODE_DESCRIPTION})
    keys = [cache.key_for_bytes(path.read_bytes()) for path in paths]      # or cache.key_for_text(prompt)
    X = cache.get_or_compute(keys, lambda idx: encode([items[i] for i in idx]))   # (N, d) in key order
    cache.stats.hits, cache.stats.misses                                      # a second run is all hits

Lower level: ``get_many(keys) -> {key: Tensor}`` (hits only) and ``put_many({key: Tensor})``.

:class:`ResultCache` keeps whole method results (``MethodResult``) under the same discipline in its own folder
``<cache_dir>/method-results-v1``; :func:`kplib.experiment.cached_run_method` builds its keys (every input, the
resolved config, the torch version and :func:`code_digest` of kplib's source).
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from . import config
from .errors import CacheError, KPLInputError

log = logging.getLogger("kplib")

MAGIC = b"KPLEMB1\n"
SUFFIX = ".kple"
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_HEADER = 4096


class CacheWarning(UserWarning):
    """The embedding cache is (partly) off; results are still computed, just not stored or reused."""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0          # entries found damaged (also counted as misses)
    writes: int = 0
    write_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def canonical_namespace(namespace: str | Mapping) -> str:
    """A namespace as a canonical string (mappings as sorted-key JSON) so equal settings give equal keys."""
    if isinstance(namespace, str):
        text = namespace
    elif isinstance(namespace, Mapping):
        text = json.dumps(namespace, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    else:
        raise KPLInputError(f"namespace must be a string or a mapping, got {type(namespace).__name__}")
    if not text.strip():
        raise KPLInputError("namespace must not be empty: it must describe the model and preprocessing")
    return text


def _atomic_write(path: Path, blob: bytes) -> None:
    """Write ``blob`` to a temporary file next to ``path``, then ``os.replace`` it: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _frame(magic: bytes, header: dict, payload: bytes) -> bytes:
    """One cache entry: magic, header length, JSON header, payload (shared by both caches)."""
    head = json.dumps(header).encode("ascii")
    return magic + struct.pack("<I", len(head)) + head + payload


def _unframe(magic: bytes, key: str, blob: bytes) -> tuple[dict, bytes]:
    """Split and check an entry written by :func:`_frame`: magic, header, key. ValueError says what is wrong."""
    start = len(magic) + 4
    if not blob.startswith(magic) or len(blob) < start:
        raise ValueError("bad magic (not a kplib cache entry, overwritten or truncated)")
    (hlen,) = struct.unpack("<I", blob[len(magic):start])
    if hlen > _MAX_HEADER or len(blob) < start + hlen:
        raise ValueError("truncated or invalid header")
    try:
        header = json.loads(blob[start:start + hlen].decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("unreadable header") from None
    if not isinstance(header, dict) or header.get("key") != key:
        raise ValueError("entry belongs to another key")
    return header, blob[start + hlen:]


class EmbeddingCache:
    """Embedding cache for one namespace (model + revision + preprocessing). See the module docstring."""

    def __init__(self, namespace: str | Mapping, root: str | os.PathLike | None = None, strict: bool = False):
        self.namespace = canonical_namespace(namespace)
        self._ns_digest = hashlib.sha256(self.namespace.encode("utf-8")).digest()
        self.strict = strict
        self.stats = CacheStats()
        self.readable = True
        self.writable = True
        self.disabled_reason: str | None = None
        base = Path(root).expanduser() if root is not None else config.cache_dir()
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.namespace)[:48].strip("_.") or "ns"
        self.folder = base / f"{slug}-{self._ns_digest.hex()[:12]}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._disable(f"cannot create cache folder {self.folder} ({exc.strerror or exc})", reads_too=True)
            return
        info = self.folder / "namespace.json"  # for humans browsing the cache
        if not info.exists():
            try:
                self._atomic_write(info, json.dumps({"namespace": self.namespace}, indent=1).encode("utf-8"))
            except OSError as exc:
                self._disable(f"cannot write to {self.folder} ({exc.strerror or exc})")

    # ---------------------------------------------------------------------------------------------- keys
    def _key(self, kind: bytes, content: bytes) -> str:
        h = hashlib.sha256()
        h.update(self._ns_digest)
        h.update(kind + b"\0")
        h.update(content)
        return h.hexdigest()

    def key_for_bytes(self, data: bytes) -> str:
        """Key of an image given its file bytes (content-addressed: renaming keeps it, editing changes it)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise KPLInputError(f"key_for_bytes needs the file's bytes, got {type(data).__name__}")
        return self._key(b"bytes", bytes(data))

    def key_for_file(self, path: str | os.PathLike) -> str:
        """``key_for_bytes`` of a file's content."""
        return self.key_for_bytes(Path(path).read_bytes())

    def key_for_text(self, text: str) -> str:
        """Key of an exact prompt text (UTF-8, no normalisation: a changed character is a different prompt)."""
        if not isinstance(text, str):
            raise KPLInputError(f"key_for_text needs a str, got {type(text).__name__}")
        return self._key(b"text", text.encode("utf-8"))

    @property
    def enabled(self) -> bool:
        return self.readable or self.writable

    def entry_path(self, key: str) -> Path:
        self._check_key(key)
        return self.folder / key[:2] / f"{key}{SUFFIX}"

    @staticmethod
    def _check_key(key: str) -> None:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise KPLInputError(f"cache key must be 64 lowercase hex characters (from key_for_*), got {key!r}")

    # ---------------------------------------------------------------------------------------------- failure
    def _disable(self, reason: str, reads_too: bool = False) -> None:
        already = not self.writable
        self.writable = False
        if reads_too:
            self.readable = False
        self.disabled_reason = reason
        message = (f"embedding cache is off: {reason}. Results are still computed, but not stored for next time. "
                   "Set KPL_CACHE_DIR to a writable folder with free space.")
        if self.strict:
            raise CacheError(message)
        if not already:
            log.warning(message)  # the CLI shows the log line (it hides the warning): it must say what to do too
            warnings.warn(CacheWarning(message), stacklevel=3)

    # ---------------------------------------------------------------------------------------------- entries
    def _encode_entry(self, key: str, value: Tensor) -> bytes:
        arr = np.ascontiguousarray(value.detach().to("cpu", torch.float32).numpy())
        payload = arr.tobytes()
        return _frame(MAGIC, {"key": key, "dtype": "float32", "shape": list(arr.shape),
                              "sha256": hashlib.sha256(payload).hexdigest()}, payload)

    def _decode_entry(self, key: str, blob: bytes) -> Tensor:
        """Parse and verify one entry; ValueError says what is wrong."""
        header, payload = _unframe(MAGIC, key, blob)
        if header.get("dtype") != "float32":
            raise ValueError(f"unexpected dtype {header.get('dtype')!r}")
        shape = header.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError("invalid shape")
        if len(payload) != int(np.prod(shape, dtype=np.int64)) * 4:
            raise ValueError(f"payload has {len(payload)} bytes, shape {shape} needs {int(np.prod(shape)) * 4}")
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            raise ValueError("checksum mismatch (data corrupted)")
        return torch.from_numpy(np.frombuffer(payload, dtype="<f4").reshape(shape).copy())

    def get_many(self, keys: Sequence[str]) -> dict[str, Tensor]:
        """Cached tensors for the keys that hit (verified); misses and damaged entries are absent."""
        out: dict[str, Tensor] = {}
        for key in keys:
            path = self.entry_path(key)
            if key in out:
                continue
            if not self.readable:
                self.stats.misses += 1
                continue
            try:
                blob = path.read_bytes()
            except FileNotFoundError:
                self.stats.misses += 1
                continue
            except OSError as exc:
                log.warning("cannot read cache entry %s (%s); recomputing", path, exc)
                self.stats.misses += 1
                continue
            try:
                out[key] = self._decode_entry(key, blob)
            except ValueError as exc:
                log.warning("corrupt cache entry %s (%s); it is discarded and recomputed", path, exc)
                self.stats.corrupt += 1
                self.stats.misses += 1
                try:
                    path.unlink()
                except OSError:
                    pass
                continue
            self.stats.hits += 1
        return out

    def get(self, key: str) -> Tensor | None:
        return self.get_many([key]).get(key)

    def _atomic_write(self, path: Path, blob: bytes) -> None:
        _atomic_write(path, blob)

    def put_many(self, items: Mapping[str, Tensor]) -> int:
        """Store tensors (float32, as given) under their keys; returns how many were written.

        A write failure (read-only folder, disk full) turns writing off with a :class:`CacheWarning` (or raises
        :class:`CacheError` when ``strict``); the caller's results are unaffected.
        """
        written = 0
        for key, value in items.items():
            path = self.entry_path(key)
            if not isinstance(value, Tensor):
                raise KPLInputError(f"cache value for key {key[:12]}… must be a torch.Tensor, got {type(value).__name__}")
            if not torch.isfinite(value).all():
                raise KPLInputError(f"refusing to cache non-finite values for key {key[:12]}…; check the encoder")
            if not self.writable:
                continue
            try:
                self._atomic_write(path, self._encode_entry(key, value))
            except OSError as exc:
                self.stats.write_errors += 1
                why = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
                self._disable(f"cannot write to {self.folder} ({why})")
                continue
            written += 1
            self.stats.writes += 1
        return written

    def get_or_compute(self, keys: Sequence[str], compute: Callable[[list[int]], Tensor]) -> Tensor:
        """Stack cached rows for ``keys`` in order, calling ``compute(miss_indices)`` once for the misses.

        ``compute`` receives the positions (into ``keys``) of the items not cached and must return a float tensor
        with one row per position. The new rows are stored, then everything is returned as ``(len(keys), ...)``.
        """
        if len(keys) == 0:
            raise KPLInputError("get_or_compute needs at least one key")
        found = self.get_many(keys)
        missing = [i for i, k in enumerate(keys) if k not in found]
        if missing:
            # the same content may appear twice: compute each missing key once
            first: dict[str, int] = {}
            for i in missing:
                first.setdefault(keys[i], i)
            todo = list(first.values())
            rows = compute(todo)
            if not isinstance(rows, Tensor) or rows.shape[0] != len(todo):
                got = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
                raise KPLInputError(f"compute() must return a tensor with {len(todo)} rows, got {got}")
            new = {keys[i]: rows[j].detach().to("cpu", torch.float32) for j, i in enumerate(todo)}
            self.put_many(new)
            found.update(new)
        return torch.stack([found[k] for k in keys])

    def clear(self) -> None:
        """Delete every entry of this namespace (other namespaces are untouched)."""
        if self.folder.is_dir():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        state = "on" if self.writable else ("read-only" if self.readable else "off")
        return f"EmbeddingCache({self.folder}, {state}, {self.stats.as_dict()})"


# ================================================================================================ method results
RESULT_MAGIC = b"KPLRES1\n"
RESULT_SUFFIX = ".kplr"
RESULT_FOLDER = "method-results-v1"   # own namespace folder under config.cache_dir()
_RESULTS_WARNED: set[str] = set()     # folders whose "result cache is off" warning was already given (per process)
_CODE_DIGEST: str | None = None


def code_digest() -> str:
    """sha256 over the name and bytes of every ``kplib/*.py`` file, computed once per process.

    Part of every result-cache key, so results computed by an edited library are never served.
    """
    global _CODE_DIGEST
    if _CODE_DIGEST is None:
        h = hashlib.sha256()
        for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
            data = path.read_bytes()
            h.update(path.name.encode("utf-8") + b"\0" + struct.pack("<Q", len(data)) + data)
        _CODE_DIGEST = h.hexdigest()
    return _CODE_DIGEST


def _result_classes() -> list[type]:
    """kplib dataclasses a stored MethodResult may contain: the only globals ``torch.load`` may build."""
    from .methods import MethodResult
    from .proxy import ProxyLearningResult
    from .transport import TransportResult

    return [MethodResult, TransportResult, ProxyLearningResult]


class ResultCache:
    """On-disk cache of :class:`kplib.methods.MethodResult` objects (see :func:`kplib.experiment.cached_run_method`,
    which builds the keys).

    Same entry discipline as :class:`EmbeddingCache`: one file per entry,
    ``<cache_dir>/method-results-v1/<key[:2]>/<key>.kplr``, holding a JSON header (key, payload size, sha256)
    followed by the ``torch.save`` bytes of the result. The header and checksum are verified *before* anything is
    deserialised, and deserialisation is ``torch.load(weights_only=True)`` with only kplib's result dataclasses
    allow-listed (no arbitrary code). A damaged entry is logged, counted in ``stats.corrupt``, deleted and treated
    as a miss. Writes are atomic (temporary file + ``os.replace``); an entry is stored only after it was checked to
    load back. An uncreatable or unwritable folder (read-only, disk full) gives one :class:`CacheWarning` per
    process and folder and the run goes on uncached; ``strict=True`` raises :class:`CacheError` instead.
    """

    def __init__(self, root: str | os.PathLike | None = None, strict: bool = False):
        base = Path(root).expanduser() if root is not None else config.cache_dir()
        self.folder = base / RESULT_FOLDER
        self.strict = strict
        self.stats = CacheStats()
        self.readable = True
        self.writable = True
        self.disabled_reason: str | None = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._disable(f"cannot create cache folder {self.folder} ({exc.strerror or exc})", reads_too=True)

    def entry_path(self, key: str) -> Path:
        EmbeddingCache._check_key(key)
        return self.folder / key[:2] / f"{key}{RESULT_SUFFIX}"

    def _disable(self, reason: str, reads_too: bool = False) -> None:
        self.writable = False
        if reads_too:
            self.readable = False
        self.disabled_reason = reason
        message = (f"method-result cache is off: {reason}. Results are still computed, but not stored for next "
                   "time. Set KPL_CACHE_DIR to a writable folder with free space.")
        if self.strict:
            raise CacheError(message)
        if str(self.folder) not in _RESULTS_WARNED:
            _RESULTS_WARNED.add(str(self.folder))
            log.warning(message)
            warnings.warn(CacheWarning(message), stacklevel=3)

    @staticmethod
    def _encode(key: str, result: object) -> bytes:
        buf = io.BytesIO()
        torch.save(result, buf)
        payload = buf.getvalue()
        return _frame(RESULT_MAGIC, {"key": key, "format": "torch.save/MethodResult", "torch": torch.__version__,
                                     "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}, payload)

    @staticmethod
    def _decode(key: str, blob: bytes):
        """Verify the header and checksum, then load safely; ValueError says what is wrong."""
        from .methods import MethodResult

        header, payload = _unframe(RESULT_MAGIC, key, blob)
        if len(payload) != header.get("size"):
            raise ValueError(f"payload has {len(payload)} bytes, header says {header.get('size')}")
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            raise ValueError("checksum mismatch (data corrupted)")
        try:
            with torch.serialization.safe_globals(_result_classes()):
                result = torch.load(io.BytesIO(payload), weights_only=True)
        except Exception as exc:  # verified bytes that still do not load (e.g. written by other code): discard
            raise ValueError(f"payload does not load safely ({type(exc).__name__}: {str(exc)[:200]})") from None
        if not isinstance(result, MethodResult):
            raise ValueError(f"payload is a {type(result).__name__}, not a MethodResult")
        return result

    def get(self, key: str):
        """The verified stored result for ``key`` or None (miss, unreadable or damaged entry — which is deleted)."""
        path = self.entry_path(key)
        if not self.readable:
            self.stats.misses += 1
            return None
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except OSError as exc:
            log.warning("cannot read result-cache entry %s (%s); recomputing", path, exc)
            self.stats.misses += 1
            return None
        try:
            result = self._decode(key, blob)
        except ValueError as exc:
            log.warning("corrupt result-cache entry %s (%s); it is discarded and recomputed", path, exc)
            self.stats.corrupt += 1
            self.stats.misses += 1
            try:
                path.unlink()
            except OSError:
                pass
            return None
        self.stats.hits += 1
        return result

    def put(self, key: str, result: object) -> bool:
        """Store ``result`` under ``key``; True when written. Results that would not load back with
        ``weights_only=True`` are not stored (logged); write failures turn writing off (see the class docstring)."""
        path = self.entry_path(key)
        if not self.writable:
            return False
        blob = self._encode(key, result)
        try:
            self._decode(key, blob)
        except ValueError as exc:
            log.warning("method result not cached: %s", exc)
            return False
        try:
            _atomic_write(path, blob)
        except OSError as exc:
            self.stats.write_errors += 1
            why = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            self._disable(f"cannot write to {self.folder} ({why})")
            return False
        self.stats.writes += 1
        return True

    def clear(self) -> None:
        """Delete every stored method result (the embedding cache is untouched)."""
        if self.folder.is_dir():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        state = "on" if self.writable else ("read-only" if self.readable else "off")
        return f"ResultCache({self.folder}, {state}, {self.stats.as_dict()})"
