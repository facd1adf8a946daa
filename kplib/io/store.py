"""The embedding store: embeddings on disk, keyed by content, in a handful of NumPy shards per namespace.

Encoding is the expensive step of every experiment, so each embedding is stored once under

- its **namespace**: everything besides the input that changes an embedding (model, revision, preprocessing, dtype,
  decoder version; :meth:`kplib.io.encoders.Encoder.namespace`), one folder per namespace digest under
  :func:`kplib.paths.cache_dir`;
- its **key**: the sha256 of the image file's bytes (:func:`content_key`: a renamed image keeps its key, an edited
  one gets a new key) or of the prompt text (:func:`text_key`).

Files are standard ``.npy`` pairs, ``<id>.keys.npy`` (``(n, 32)`` uint8, rows sorted) and ``<id>.rows.npy``
(``(n, d)`` float32), read memory-mapped. Each :meth:`EmbeddingStore.put` writes a new small shard (temporary file
then ``os.replace``, the keys file last, so a reader never sees half a shard); when more than :data:`MAX_SHARDS`
exist the small ones are merged, so the folder holds a handful of files however many embeddings it holds. A lookup
is vectorised: the first 8 bytes of each key, read as a big-endian integer, are searched in each shard's sorted keys
(``numpy.searchsorted``) and every hit's full key is compared.

Nothing is trusted blindly: a shard whose files are truncated, have a bad header or inconsistent sizes, or whose rows
are not finite unit vectors, is logged, deleted and reads as misses (the caller recomputes them). A folder that cannot
be written (read-only, disk full) turns writing off with one :class:`~kplib.errors.CacheWarning`; results are still
computed, just not stored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
import uuid
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .. import paths
from ..errors import CacheWarning, KPLInputError

log = logging.getLogger("kplib")

#: More shards than this trigger a merge after a put.
MAX_SHARDS = 8
#: Largest allowed | ||x||^2 - 1 | of a stored row (float32 normalisation errors are ~1e-6).
UNIT_TOL = 1e-4
FORMAT = "kplib-embeddings-v1"
_CHUNK = 1024  # rows copied at a time (a few MB, so checks and copies run from cache)
_THREADS = min(4, os.cpu_count() or 1)  # numpy releases the GIL while copying
_STALE_S = 3600  # leftovers (temporary files of killed writers) older than this are removed when merging


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
    """Counts of one store object: rows found, rows not found, rows written, shards found damaged."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    damaged: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Damaged(Exception):
    """A source shard (``args[0]``: its index) holds rows that are not finite unit vectors."""


@dataclass
class _Shard:
    name: str
    keys: np.ndarray    # (n, 32) uint8, sorted
    prefix: np.ndarray  # (n,) uint64: first 8 bytes of each key, big-endian
    rows: np.ndarray    # (n, d) float32, memory-mapped


class EmbeddingStore:
    """Embeddings of one namespace, on disk under ``root`` (default :func:`kplib.paths.cache_dir`).

    Parameters
    ----------
    namespace : dict
        What besides the key determines an embedding (JSON-serialisable); its digest names the folder.
    root : path, optional
        Parent folder of the namespace folders.
    """

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
        self.stats = StoreStats()
        self.writable = True
        self._dim = namespace.get("embed_dim") if isinstance(namespace.get("embed_dim"), int) else None
        self._open: dict[str, _Shard] = {}
        self._bad: set[str] = set()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not (self.folder / "namespace.json").is_file():
                self._atomic(self.folder / "namespace.json",
                             lambda fh: fh.write(json.dumps({"format": FORMAT, "namespace": json.loads(text)},
                                                            indent=1).encode()))
        except OSError as exc:
            self._disable(exc)

    def __repr__(self) -> str:
        return f"EmbeddingStore({self.folder}, {'on' if self.writable else 'read-only'}, {self.stats.as_dict()})"

    # ------------------------------------------------------------------------------------------------ reading
    def get(self, keys: Sequence[bytes]) -> tuple[Tensor, Tensor]:
        """Look ``keys`` up: ``(found, rows)``, ``found`` a bool tensor ``(n,)`` and ``rows`` ``(n, d)`` float32 with
        zeros where not found (``d`` is 0 while the store is empty and its namespace names no ``embed_dim``)."""
        q = _key_array(keys)
        shards = self._shards()
        d = shards[0].rows.shape[1] if shards else (self._dim or 0)
        out = np.empty((len(q), d), np.float32)
        found = np.zeros(len(q), bool)
        if len(q) and shards:
            qp = _prefix(q)
            order = np.argsort(qp)
            sq, sk = qp[order], q[order].view(np.uint64)
            todo = np.arange(len(q))
            for shard in shards:  # newest first
                if not len(todo):
                    break
                pos = np.minimum(np.searchsorted(shard.prefix, sq[todo]), len(shard.prefix) - 1)
                hit = (shard.prefix[pos] == sq[todo]) & (shard.keys.view(np.uint64)[pos] == sk[todo]).all(1)
                if hit.any() and not _copy_rows(shard.rows, pos[hit], out, order[todo[hit]]):
                    self._drop(shard.name, "rows that are not finite unit vectors")
                    continue
                found[order[todo[hit]]] = True
                todo = todo[~hit]
        out[~found] = 0
        hits = int(found.sum())
        self.stats.hits += hits
        self.stats.misses += len(q) - hits
        return torch.from_numpy(found), torch.from_numpy(out)

    def _shards(self) -> list[_Shard]:
        """The readable shards, newest first (shards written by other processes included)."""
        try:
            names = sorted((p.name[:-len(".keys.npy")] for p in self.folder.glob("*.keys.npy")), reverse=True)
        except OSError:
            return []
        self._open = {n: s for n, s in self._open.items() if n in names}
        for name in names:
            if name not in self._open and name not in self._bad:
                try:
                    self._open[name] = self._read(name)
                except FileNotFoundError:  # merged away by another process meanwhile
                    continue
                except (OSError, ValueError, EOFError, SyntaxError) as exc:
                    self._drop(name, str(exc))
        return [self._open[n] for n in names if n in self._open]

    def _read(self, name: str) -> _Shard:
        keys = _load_npy(self.folder / f"{name}.keys.npy", mmap=False)
        rows = _load_npy(self.folder / f"{name}.rows.npy", mmap=True)
        if keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != 32 or not len(keys):
            raise ValueError(f"keys have dtype {keys.dtype} and shape {keys.shape}, expected uint8 (n, 32)")
        if rows.dtype != np.dtype("<f4") or rows.ndim != 2 or rows.shape[0] != len(keys):
            raise ValueError(f"rows have dtype {rows.dtype} and shape {rows.shape}, expected float32 ({len(keys)}, d)")
        if self._dim is not None and rows.shape[1] != self._dim:
            raise ValueError(f"rows have {rows.shape[1]} columns, the namespace says {self._dim}")
        prefix = _prefix(keys)
        if (prefix[1:] < prefix[:-1]).any():
            raise ValueError("keys are not sorted")
        self._dim = rows.shape[1]
        return _Shard(name, keys, prefix, rows)

    def _drop(self, name: str, why: str) -> None:
        """A damaged shard: logged, counted, deleted (its keys read as misses from now on)."""
        log.warning("damaged embedding shard %s (%s); it is deleted and its embeddings are recomputed",
                    self.folder / name, why)
        self.stats.damaged += 1
        self._bad.add(name)
        self._open.pop(name, None)
        for suffix in (".keys.npy", ".rows.npy"):
            try:
                (self.folder / f"{name}{suffix}").unlink()
            except OSError:
                pass

    # ------------------------------------------------------------------------------------------------ writing
    def put(self, keys: Sequence[bytes], rows: Tensor | np.ndarray) -> int:
        """Store ``rows`` (``(n, d)`` finite unit rows) under ``keys``; returns how many rows were written.

        A key given twice keeps its last row; rows are written a chunk at a time, sorted by key. A folder that cannot be written turns writing off with one
        :class:`~kplib.errors.CacheWarning` and returns 0; nothing else changes for the caller.
        """
        q = _key_array(keys)
        x = np.ascontiguousarray(rows.detach().cpu().numpy() if isinstance(rows, Tensor) else np.asarray(rows),
                                 dtype=np.float32)
        if x.ndim != 2 or len(x) != len(q):
            raise KPLInputError(f"rows must be a ({len(q)}, d) matrix (one row per key), got shape {x.shape}")
        if not _unit_rows(x):
            raise KPLInputError("refusing to store rows that are not finite unit vectors; check the encoder output")
        if self._dim is not None and x.shape[1] != self._dim:
            raise KPLInputError(f"rows have {x.shape[1]} columns but this store holds {self._dim}-d embeddings: "
                                "the namespace must change with the model")
        if not self.writable or not len(q):
            return 0
        keep = _sorted_unique(q)
        try:
            self._write(_new_name(), q[keep], [x], np.zeros(len(keep), np.int64), keep, check=False)
        except OSError as exc:
            self._disable(exc)
            return 0
        self._dim = x.shape[1]
        self.stats.writes += len(keep)
        shards = self._shards()
        if len(shards) > MAX_SHARDS:
            self._merge(shards)
        return len(keep)

    def _write(self, name: str, keys: np.ndarray, sources: list[np.ndarray], src: np.ndarray, row: np.ndarray,
               check: bool) -> None:
        """Write shard ``name``: row ``i`` is ``sources[src[i]][row[i]]``, gathered and written a chunk at a time (no
        copy of the whole matrix in memory); the keys file last (it commits the shard). With ``check``, a source
        whose rows are not finite unit vectors raises ``_Damaged(index)`` and nothing is written."""
        def rows(fh) -> None:
            shape = (len(keys), sources[0].shape[1])
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": shape})
            buf = np.empty((_CHUNK * 16, shape[1]), np.float32)
            for j in range(0, len(keys), len(buf)):
                k, s, r = min(len(buf), len(keys) - j), src[j:j + len(buf)], row[j:j + len(buf)]
                for i in np.unique(s):
                    piece = sources[i][r[s == i]]
                    if check and not _unit_rows(piece):
                        raise _Damaged(i)
                    buf[:k][s == i] = piece
                fh.write(buf[:k].data)
        self._atomic(self.folder / f"{name}.rows.npy", rows)
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
        """Merge the small shards into one (all of them when they outweigh the largest); the newest row of a key wins."""
        shards = sorted(shards, key=lambda s: len(s.keys))
        if sum(len(s.keys) for s in shards[:-1]) < len(shards[-1].keys):
            shards = shards[:-1]
        shards.sort(key=lambda s: s.name)  # oldest first
        keys = np.concatenate([s.keys for s in shards])
        keep = _sorted_unique(keys)
        src = np.concatenate([np.full(len(s.keys), i) for i, s in enumerate(shards)])[keep]
        row = np.concatenate([np.arange(len(s.keys)) for s in shards])[keep]
        name = f"{shards[-1].name.split('-')[0]}-{_new_name().split('-', 1)[1]}"  # ordered as its newest input
        try:
            self._write(name, keys[keep], [s.rows for s in shards], src, row, check=True)
        except _Damaged as exc:
            self._drop(shards[exc.args[0]].name, "rows that are not finite unit vectors")
            return  # merged again after a later put, without the damaged shard
        except OSError as exc:
            self._disable(exc)
            return
        for s in shards:
            self._open.pop(s.name, None)
            for suffix in (".keys.npy", ".rows.npy"):  # keys first: a shard without keys is not read
                try:
                    (self.folder / f"{s.name}{suffix}").unlink()
                except OSError:
                    pass
        self._sweep()

    def _sweep(self) -> None:
        """Remove leftovers of killed writers: temporary files and rows files whose keys never came."""
        limit = time.time() - _STALE_S
        for p in self.folder.iterdir():
            stale = p.name.endswith(".tmp") or (p.name.endswith(".rows.npy") and not
                                                 p.with_name(p.name[:-len("rows.npy")] + "keys.npy").exists())
            try:
                if stale and p.stat().st_mtime < limit:
                    p.unlink()
            except OSError:
                pass

    def _disable(self, exc: OSError) -> None:
        if self.writable:
            self.writable = False
            msg = (f"embedding store is off: cannot write to {self.folder} ({exc.strerror or exc}). Results are still "
                   "computed, but not stored for next time. Set KPL_CACHE_DIR to a writable folder with free space.")
            log.warning(msg)
            warnings.warn(msg, CacheWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------------- helpers
def _key_array(keys: Sequence[bytes]) -> np.ndarray:
    keys = list(keys)
    try:
        joined = b"".join(keys)
        ok = (np.fromiter(map(len, keys), np.int64, len(keys)) == 32).all()
    except TypeError:
        ok = False
    if not ok:
        bad = next(k for k in keys if not isinstance(k, (bytes, bytearray)) or len(k) != 32)
        raise KPLInputError(f"store keys must be 32-byte digests from content_key or text_key, got {bad!r:.80}")
    return np.frombuffer(joined, np.uint8).reshape(len(keys), 32)


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    """Indices that order ``keys`` by :func:`_prefix`, one per distinct key: the last given of equal keys.

    Equal keys sit next to each other after the stable sort unless two distinct keys share their first 8 bytes
    (chance ~n^2 / 2^65); such a key may then be stored twice or read as a miss, never with another key's row.
    """
    order = np.argsort(_prefix(keys), kind="stable")
    k = keys[order].view(np.uint64)
    return order[np.append((k[1:] != k[:-1]).any(1), True)]


def _prefix(keys: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(keys[:, :8]).view(">u8").ravel().astype(np.uint64)


def _new_name() -> str:
    return f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _unit_rows(x: np.ndarray) -> bool:
    return bool((np.abs(np.einsum("ij,ij->i", x, x) - 1) <= UNIT_TOL).all())


def _copy_rows(src: np.ndarray, src_idx: np.ndarray, out: np.ndarray, dst_idx: np.ndarray) -> bool:
    """``out[dst_idx] = src[src_idx]`` (``src_idx`` ascending), a few MB at a time on up to :data:`_THREADS` threads
    (copies and checks run from the cache); False if a row is not a finite unit vector (``out`` is then partly
    written)."""
    def copy(j: int) -> bool:
        s, d = src_idx[j:j + _CHUNK], dst_idx[j:j + _CHUNK]
        block = src[s[0]:s[-1] + 1] if s[-1] - s[0] == len(s) - 1 else src[s]
        if not _unit_rows(block):
            return False
        out[d] = block
        return True

    starts = range(0, len(src_idx), _CHUNK)
    if len(starts) == 1:
        return copy(0)
    with ThreadPoolExecutor(_THREADS) as pool:
        return all(list(pool.map(copy, starts)))


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    """A ``.npy`` file whose size matches its header exactly (ValueError otherwise), memory-mapped or read."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        offset = fh.tell()
        size = os.fstat(fh.fileno()).st_size
        expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if fortran or dtype.hasobject or size != expected:
            raise ValueError(f"{size} bytes where the header describes {expected} (truncated or overwritten)")
        if mmap:
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        return np.fromfile(fh, dtype=dtype, count=int(np.prod(shape, dtype=np.int64))).reshape(shape)
