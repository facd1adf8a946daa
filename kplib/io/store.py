"""The embedding store: embeddings on disk, keyed by content, in a handful of NumPy shards per namespace.

Each embedding is stored once, under its **namespace** (everything besides the input that changes an embedding:
:meth:`kplib.io.encoders.Encoder.namespace` plus the decoder version; one folder per namespace digest under
:func:`kplib.paths.cache_dir`) and its **key**: the sha256 of the image file's bytes (:func:`content_key`: a renamed
image keeps its key, an edited one gets a new one) or of the prompt text (:func:`text_key`).

A shard is two standard ``.npy`` files, ``<id>.keys.npy`` (``(n, 32)`` uint8, sorted) and ``<id>.rows.npy``
(``(n, d)`` float32), read memory-mapped. A put writes a new shard atomically (temporary file, ``os.replace``, keys
last, so a reader never sees half a shard) and past :data:`MAX_SHARDS` merges the small ones. A lookup finds each
key's first 8 bytes (a big-endian integer) by ``numpy.searchsorted`` and compares the full key. A shard that is
truncated, has a bad header or sizes, or holds rows that are not finite unit vectors is logged, deleted and reads as
misses. A folder that cannot be written (read-only, disk full) turns writing off with one
:class:`~kplib.errors.CacheWarning`: results are still computed, just not stored.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .. import paths
from ..errors import CacheWarning, KPLInputError

log = logging.getLogger("kplib")

MAX_SHARDS = 8        # more shards than this trigger a merge after a put
UNIT_TOL = 1e-4       # largest | ||x||^2 - 1 | of a stored row (float32 normalisation errors are ~1e-6)
FORMAT = "kplib-embeddings-v1"
_CHUNK = 1024         # rows copied at a time: a few MB, so checks and copies run from the CPU cache
_THREADS = min(4, os.cpu_count() or 1)   # numpy releases the GIL while it sorts, searches and copies
_STALE_S = 3600       # leftovers of killed writers older than this are removed when merging


def content_key(data: bytes) -> bytes:
    """Key of an image: sha256 of its file bytes (32 bytes)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise KPLInputError(f"content_key needs the file's bytes, got {type(data).__name__}")
    return hashlib.sha256(data).digest()


def text_key(text: str) -> bytes:
    """Key of a prompt: sha256 of its exact UTF-8 text (32 bytes; no normalisation)."""
    if not isinstance(text, str):
        raise KPLInputError(f"text_key needs a str, got {type(text).__name__}")
    return hashlib.sha256(text.encode("utf-8")).digest()


@dataclass
class StoreStats:
    """Rows found, rows not found, rows written and shards found damaged by one store object."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    damaged: int = 0


@dataclass
class _Shard:
    name: str
    keys: np.ndarray    # (n, 32) uint8, sorted by prefix
    prefix: np.ndarray  # (n,) uint64: the first 8 bytes of each key, big-endian
    rows: np.ndarray    # (n, d) float32, memory-mapped


class _Damaged(Exception):
    """Shard ``args[0]`` (an index) holds rows that are not finite unit vectors."""


class EmbeddingStore:
    """Embeddings of one ``namespace`` (a JSON-serialisable dict) under ``root`` (default :func:`paths.cache_dir`)."""

    content_key = staticmethod(content_key)
    text_key = staticmethod(text_key)

    def __init__(self, namespace: dict, root: str | os.PathLike | None = None):
        if not isinstance(namespace, dict) or not namespace:
            raise KPLInputError("namespace must be a non-empty dict describing the model and preprocessing")
        self.namespace = namespace
        text = json.dumps(namespace, sort_keys=True, separators=(",", ":"), default=str)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{namespace.get('kind', 'x')}-{namespace.get('model', '')}")
        base = Path(root).expanduser() if root is not None else paths.cache_dir()
        self.folder = base / f"{slug[-48:].strip('_.')}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        self.stats, self.writable = StoreStats(), True
        self._dim = namespace.get("embed_dim") if isinstance(namespace.get("embed_dim"), int) else None
        self._open: dict[str, _Shard] = {}
        self._bad: set[str] = set()
        info = json.dumps({"format": FORMAT, "namespace": json.loads(text)}, indent=1).encode()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not (self.folder / "namespace.json").is_file():
                self._atomic(self.folder / "namespace.json", lambda fh: fh.write(info))
        except OSError as exc:
            self._disable(exc)

    def __repr__(self) -> str:
        return f"EmbeddingStore({self.folder}, {'on' if self.writable else 'read-only'}, {asdict(self.stats)})"

    def get(self, keys: Sequence[bytes]) -> tuple[Tensor, Tensor]:
        """``(found, rows)`` for ``keys``: a bool tensor ``(n,)`` and float32 ``(n, d)`` rows, zeros where not found
        (``d`` is 0 while the store is empty and the namespace has no ``embed_dim``)."""
        q = _key_array(keys)
        shards = self._shards()
        out = np.empty((len(q), self._dim or 0), np.float32)  # _shards() set _dim when there is one
        found = np.zeros(len(q), bool)
        if len(q) and shards:
            qp, q64, todo = _prefix(q), q.view(np.uint64), np.arange(len(q))
            for shard in shards:  # newest first; large queries split over threads, each sorted, found and copied
                parts = np.array_split(todo, min(_THREADS, 1 + len(todo) // (4 * _CHUNK)))
                with ThreadPoolExecutor(len(parts)) as pool:
                    hits = list(pool.map(lambda part, shard=shard: _lookup(shard, qp, q64, part, out), parts))
                if any(h is None for h in hits):
                    self._drop(shard.name, "rows that are not finite unit vectors")
                    continue
                hit = np.concatenate(hits)
                found[todo[hit]] = True
                todo = todo[~hit]
        out[~found] = 0
        self.stats.hits += int(found.sum())
        self.stats.misses += len(q) - int(found.sum())
        return torch.from_numpy(found), torch.from_numpy(out)

    def put(self, keys: Sequence[bytes], rows: Tensor | np.ndarray) -> int:
        """Store ``rows`` (``(n, d)`` finite unit rows) under ``keys``; returns how many rows were written.

        A key given twice keeps its last row. A folder that cannot be written turns writing off with one
        :class:`~kplib.errors.CacheWarning` and returns 0; nothing else changes for the caller.
        """
        q = _key_array(keys)
        x = np.ascontiguousarray(rows.detach().cpu().numpy() if isinstance(rows, Tensor) else rows, np.float32)
        if x.ndim != 2 or len(x) != len(q):
            raise KPLInputError(f"rows must be a ({len(q)}, d) matrix (one row per key), got shape {x.shape}")
        if not _unit_rows(x):
            raise KPLInputError("refusing to store rows that are not finite unit vectors; check the encoder output")
        if self._dim is not None and x.shape[1] != self._dim:
            raise KPLInputError(f"rows have {x.shape[1]} columns but this store holds {self._dim}-d embeddings; the "
                                "namespace must change with the model")
        if not self.writable or not len(q):
            return 0
        keep = _sorted_unique(q)
        buf = np.empty((min(_CHUNK, len(keep)), x.shape[1]), np.float32)  # one reused buffer: no fresh pages per block
        parts = (keep[j:j + _CHUNK] for j in range(0, len(keep), _CHUNK))
        blocks = (np.take(x, part, axis=0, out=buf[:len(part)]) for part in parts)
        try:
            self._write(_new_name(), q[keep], x.shape[1], blocks)
        except OSError as exc:
            self._disable(exc)
            return 0
        self._dim = x.shape[1]
        self.stats.writes += len(keep)
        if len(shards := self._shards()) > MAX_SHARDS:
            self._merge(shards)
        return len(keep)

    # ------------------------------------------------------------------------------------------------ shards
    def _shards(self) -> list[_Shard]:
        """The readable shards, newest first (those other processes wrote included)."""
        try:
            names = sorted((p.name[:-len(".keys.npy")] for p in self.folder.glob("*.keys.npy")), reverse=True)
        except OSError:
            return []
        self._open = {n: s for n, s in self._open.items() if n in names}
        for name in (n for n in names if n not in self._open and n not in self._bad):
            try:
                keys, rows = (_load_npy(self.folder / f"{name}.{part}.npy") for part in ("keys", "rows"))
                if keys.dtype != np.uint8 or keys.shape[1:] != (32,) or not len(keys):
                    raise ValueError(f"keys of dtype {keys.dtype} and shape {keys.shape}, not uint8 (n, 32)")
                if rows.dtype != np.dtype("<f4") or rows.ndim != 2 or \
                        rows.shape != (len(keys), self._dim or rows.shape[1]):
                    raise ValueError(f"rows of dtype {rows.dtype} and shape {rows.shape} for {len(keys)} keys")
                prefix = _prefix(keys)
                if (prefix[1:] < prefix[:-1]).any():
                    raise ValueError("keys are not sorted")
                self._open[name] = _Shard(name, np.array(keys), prefix, rows)
                self._dim = rows.shape[1]
            except FileNotFoundError:  # merged away by another process meanwhile
                continue
            except (OSError, ValueError, EOFError, SyntaxError) as exc:
                self._drop(name, str(exc))
        return [self._open[n] for n in names if n in self._open]

    def _drop(self, name: str, why: str) -> None:
        log.warning("damaged embedding shard %s (%s); it is deleted and its embeddings are recomputed",
                    self.folder / name, why)
        self.stats.damaged += 1
        self._bad.add(name)
        self._delete(name)

    def _delete(self, name: str) -> None:
        self._open.pop(name, None)
        for part in ("keys", "rows"):  # keys first: rows without keys are never read
            with contextlib.suppress(OSError):
                (self.folder / f"{name}.{part}.npy").unlink()

    def _write(self, name: str, keys: np.ndarray, dim: int, blocks: Iterable[np.ndarray]) -> None:
        """Write shard ``name``: the rows block by block, then the keys."""
        def write_rows(fh) -> None:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (len(keys), dim)})
            for block in blocks:
                fh.write(np.ascontiguousarray(block, np.float32).data)
        self._atomic(self.folder / f"{name}.rows.npy", write_rows)
        self._atomic(self.folder / f"{name}.keys.npy", lambda fh: np.save(fh, keys))

    def _atomic(self, path: Path, write) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _merge(self, shards: list[_Shard]) -> None:
        """Merge the small shards into one (all when they outweigh the largest); the newest row of a key wins."""
        shards = sorted(shards, key=lambda s: len(s.keys))
        if sum(len(s.keys) for s in shards[:-1]) < len(shards[-1].keys):
            shards = shards[:-1]
        shards.sort(key=lambda s: s.name)  # oldest first
        keys = np.concatenate([s.keys for s in shards])
        keep = _sorted_unique(keys)
        src = np.concatenate([np.full(len(s.keys), i) for i, s in enumerate(shards)])[keep]
        row = np.concatenate([np.arange(len(s.keys)) for s in shards])[keep]

        def blocks():
            buf = np.empty((_CHUNK, shards[0].rows.shape[1]), np.float32)
            for j in range(0, len(keep), _CHUNK):
                s, r = src[j:j + _CHUNK], row[j:j + _CHUNK]
                block = buf[:len(s)]
                for i in np.unique(s):
                    block[s == i] = shards[i].rows[r[s == i]]
                    if not _unit_rows(block[s == i]):
                        raise _Damaged(i)
                yield block
        try:  # named as its newest input, so shards written meanwhile stay newer
            self._write(f"{shards[-1].name[:20]}-{_new_name()[21:]}", keys[keep], shards[0].rows.shape[1], blocks())
        except _Damaged as exc:
            return self._drop(shards[exc.args[0]].name, "rows that are not finite unit vectors")
        except OSError as exc:
            return self._disable(exc)
        for s in shards:
            self._delete(s.name)
        stale = time.time() - _STALE_S
        for p in self.folder.iterdir():  # leftovers of killed writers: temporary files, rows whose keys never came
            with contextlib.suppress(OSError):  # removed meanwhile by another process
                orphan = p.name.endswith(".rows.npy") and not p.with_name(p.name[:-8] + "keys.npy").exists()
                if (p.name.endswith(".tmp") or orphan) and p.stat().st_mtime < stale:
                    p.unlink()

    def _disable(self, exc: OSError) -> None:
        if self.writable:
            self.writable = False
            msg = (f"embedding store is off: cannot write to {self.folder} ({exc.strerror or exc}). Results are still "
                   "computed, but not stored for next time. Set KPL_CACHE_DIR to a writable folder with free space.")
            log.warning(msg)
            warnings.warn(msg, CacheWarning, stacklevel=3)


def _key_array(keys: Sequence[bytes]) -> np.ndarray:
    keys = keys if isinstance(keys, list) else list(keys)
    try:
        joined = b"".join(keys)
    except TypeError:
        joined = b""
    if len(joined) != 32 * len(keys) or len(set(map(len, keys))) > 1:
        bad = next(k for k in keys if not isinstance(k, (bytes, bytearray)) or len(k) != 32)
        raise KPLInputError(f"store keys must be 32-byte digests from content_key or text_key, got {bad!r:.80}")
    return np.frombuffer(joined, np.uint8).reshape(len(keys), 32)


def _prefix(keys: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(keys[:, :8]).view(">u8").ravel().astype(np.uint64)


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    """Indices ordering ``keys`` by :func:`_prefix`, one per distinct key (the last given). Two distinct keys with the
    same first 8 bytes (chance ~n^2 / 2^65) may be stored twice or read as a miss, never with another key's row."""
    order = np.argsort(_prefix(keys), kind="stable")
    k = keys[order].view(np.uint64)
    return order[np.append((k[1:] != k[:-1]).any(1), True)]


def _new_name() -> str:
    return f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _unit_rows(x: np.ndarray) -> bool:
    return bool((np.abs(np.einsum("ij,ij->i", x, x) - 1) <= UNIT_TOL).all())


def _lookup(shard: _Shard, qp: np.ndarray, q64: np.ndarray, idx: np.ndarray, out: np.ndarray) -> np.ndarray | None:
    """Copy the rows of queries ``idx`` found in ``shard`` into ``out``; the hit mask over ``idx``, or None if a row
    is not a finite unit vector."""
    order = np.argsort(qp[idx])
    sel = idx[order]
    pos = np.minimum(np.searchsorted(shard.prefix, qp[sel]), len(shard.prefix) - 1)
    hit = (shard.prefix[pos] == qp[sel]) & (shard.keys.view(np.uint64)[pos] == q64[sel]).all(1)
    src, dst = pos[hit], sel[hit]  # src ascending: the shard is read front to back
    for j in range(0, len(src), _CHUNK):
        s = src[j:j + _CHUNK]
        block = shard.rows[s[0]:s[-1] + 1] if s[-1] - s[0] == len(s) - 1 else shard.rows[s]
        if not _unit_rows(block):
            return None
        out[dst[j:j + _CHUNK]] = block
    mask = np.zeros(len(idx), bool)
    mask[order[hit]] = True
    return mask


def _load_npy(path: Path) -> np.ndarray:
    """A memory-mapped ``.npy`` file whose size matches its header exactly (ValueError otherwise)."""
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if os.path.getsize(path) != arr.offset + arr.nbytes:
        raise ValueError(f"{os.path.getsize(path)} bytes where the header describes {arr.offset + arr.nbytes}")
    return arr
