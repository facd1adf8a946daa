"""Tests of kplib.cache: content addressing, integrity checks, atomic writes, graceful degradation."""
from __future__ import annotations

import errno
import warnings
from pathlib import Path

import pytest
import torch

from kplib import cache as cache_mod
from kplib.cache import CacheWarning, EmbeddingCache
from kplib.errors import CacheError, KPLInputError

NS = {"model": "test/model", "revision": "abc123", "preprocessing": "resize 224, center crop", "decode": "v1"}


class CountingEncoder:
    """Deterministic fake encoder: embedding depends on the bytes; counts how many items it encoded."""

    def __init__(self, dim: int = 6):
        self.dim = dim
        self.calls = 0

    def __call__(self, blobs: list[bytes]) -> torch.Tensor:
        self.calls += len(blobs)
        g = torch.Generator().manual_seed(0)
        rows = [torch.randn(self.dim, generator=g.manual_seed(sum(b) * 31 + len(b))) for b in blobs]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def files(tmp_path: Path, n: int = 4) -> list[Path]:
    out = []
    for i in range(n):
        p = tmp_path / "imgs" / f"f{i}.bin"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(bytes([i + 1]) * (10 + i))
        out.append(p)
    return out


def encode_with_cache(cache: EmbeddingCache, paths: list[Path], enc: CountingEncoder) -> torch.Tensor:
    blobs = [p.read_bytes() for p in paths]
    keys = [cache.key_for_bytes(b) for b in blobs]
    return cache.get_or_compute(keys, lambda idx: enc([blobs[i] for i in idx]))


def test_default_root_is_config_cache_dir(isolated_cache):
    c = EmbeddingCache(NS)
    assert c.folder.parent == isolated_cache and c.folder.is_dir()
    assert (c.folder / "namespace.json").is_file()


def test_second_run_is_all_hits_and_values_exact(tmp_path):
    paths, enc = files(tmp_path), CountingEncoder()
    first = encode_with_cache(EmbeddingCache(NS), paths, enc)
    assert enc.calls == 4
    again = EmbeddingCache(NS)                       # a new process would construct a fresh object
    second = encode_with_cache(again, paths, enc)
    assert enc.calls == 4                            # nothing recomputed
    assert again.stats.hits == 4 and again.stats.misses == 0 and again.stats.corrupt == 0
    assert second.dtype == torch.float32 and torch.equal(first, second)   # bit-exact float32


def test_changed_bytes_invalidate_and_rename_hits(tmp_path):
    paths, enc = files(tmp_path), CountingEncoder()
    c = EmbeddingCache(NS)
    encode_with_cache(c, paths, enc)
    paths[0].write_bytes(b"edited image content")   # edited -> new key
    paths[1].rename(paths[1].with_name("renamed.bin"))
    paths[1] = paths[1].with_name("renamed.bin")     # renamed -> same bytes, same key
    c2 = EmbeddingCache(NS)
    encode_with_cache(c2, paths, enc)
    assert enc.calls == 5 and c2.stats.hits == 3 and c2.stats.misses == 1


def test_keys_depend_on_namespace_and_kind():
    a, b = EmbeddingCache(NS), EmbeddingCache({**NS, "revision": "other"})
    assert a.key_for_bytes(b"x") != b.key_for_bytes(b"x")
    assert a.key_for_bytes(b"x") != a.key_for_text("x")
    assert a.key_for_text("a photo") != a.key_for_text("a photo ")
    assert EmbeddingCache(dict(reversed(list(NS.items())))).key_for_text("t") == a.key_for_text("t")  # key order
    assert a.folder != b.folder


def test_text_entries_roundtrip():
    c = EmbeddingCache("text-ns")
    keys = [c.key_for_text(t) for t in ["glioma", "méningiome", "a photo of a {x}"]]
    vals = torch.randn(3, 5)
    assert c.put_many(dict(zip(keys, vals))) == 3
    got = EmbeddingCache("text-ns").get_many(keys)
    assert all(torch.equal(got[k], v) for k, v in zip(keys, vals))


def test_get_or_compute_computes_duplicates_once():
    c = EmbeddingCache(NS)
    k = [c.key_for_text("same"), c.key_for_text("same"), c.key_for_text("other")]
    seen = []

    def compute(idx):
        seen.append(list(idx))
        return torch.ones(len(idx), 3)

    out = c.get_or_compute(k, compute)
    assert seen == [[0, 2]] and out.shape == (3, 3)
    with pytest.raises(KPLInputError, match="2 rows"):
        EmbeddingCache("x").get_or_compute(k, lambda idx: torch.ones(5, 3))


def _one_entry(tmp_path) -> tuple[EmbeddingCache, str, torch.Tensor]:
    c = EmbeddingCache(NS)
    key = c.key_for_bytes(b"some image bytes")
    val = torch.randn(16)
    c.put_many({key: val})
    return c, key, val


def test_truncated_entry_is_detected_and_recomputed(tmp_path, caplog):
    c, key, val = _one_entry(tmp_path)
    path = c.entry_path(key)
    blob = path.read_bytes()
    path.write_bytes(blob[:-7])
    c2 = EmbeddingCache(NS)
    with caplog.at_level("WARNING", logger="kplib"):
        assert c2.get_many([key]) == {}
    assert c2.stats.corrupt == 1 and c2.stats.misses == 1 and "corrupt cache entry" in caplog.text
    assert not path.exists()                          # damaged entry discarded
    out = c2.get_or_compute([key], lambda idx: val.unsqueeze(0))
    assert torch.equal(out[0], val) and EmbeddingCache(NS).get(key) is not None


@pytest.mark.parametrize("where", ["payload", "header", "magic"])
def test_flipped_byte_is_never_trusted(tmp_path, where):
    c, key, val = _one_entry(tmp_path)
    path = c.entry_path(key)
    blob = bytearray(path.read_bytes())
    pos = {"payload": len(blob) - 3, "header": len(cache_mod.MAGIC) + 10, "magic": 0}[where]
    blob[pos] ^= 0x01
    path.write_bytes(bytes(blob))
    c2 = EmbeddingCache(NS)
    assert c2.get(key) is None and c2.stats.corrupt == 1


def test_entry_moved_to_another_key_is_rejected(tmp_path):
    c, key, _ = _one_entry(tmp_path)
    other = c.key_for_bytes(b"different")
    dest = c.entry_path(other)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(c.entry_path(key).read_bytes())
    assert c.get(other) is None and c.stats.corrupt == 1


def test_cache_dir_under_a_file_warns_and_still_works(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.warns(CacheWarning, match="cache is off"):
        c = EmbeddingCache(NS, root=blocker / "cache")
    assert not c.enabled and "cannot create" in c.disabled_reason
    paths, enc = files(tmp_path), CountingEncoder()
    out = encode_with_cache(c, paths, enc)
    assert out.shape == (4, 6) and enc.calls == 4
    encode_with_cache(c, paths, enc)
    assert enc.calls == 8                             # nothing cached, results still produced
    with pytest.raises(CacheError, match="KPL_CACHE_DIR"):
        EmbeddingCache(NS, root=blocker / "cache", strict=True)


def test_disk_full_on_write_warns_once_and_still_works(tmp_path, monkeypatch):
    c = EmbeddingCache(NS)
    calls = []

    def full(src, dst):
        calls.append(dst)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_mod.os, "replace", full)
    paths, enc = files(tmp_path), CountingEncoder()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = encode_with_cache(c, paths, enc)
        encode_with_cache(c, paths, enc)
    cache_warnings = [w for w in rec if issubclass(w.category, CacheWarning)]
    assert len(cache_warnings) == 1 and "disk full" in str(cache_warnings[0].message)
    assert out.shape == (4, 6) and enc.calls == 8
    assert len(calls) == 1 and c.stats.write_errors == 1 and not c.writable and c.readable
    leftovers = [p for p in c.folder.rglob("*") if p.is_file() and p.name != "namespace.json"]
    assert leftovers == []                            # temp file removed, no partial entry


def test_read_only_cache_keeps_serving_hits(tmp_path, monkeypatch):
    paths, enc = files(tmp_path), CountingEncoder()
    encode_with_cache(EmbeddingCache(NS), paths[:2], enc)
    c = EmbeddingCache(NS)

    def denied(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cache_mod.os, "replace", denied)
    with pytest.warns(CacheWarning, match="Permission denied"):
        encode_with_cache(c, paths, enc)
    assert c.stats.hits == 2 and enc.calls == 4


def test_invalid_inputs():
    c = EmbeddingCache(NS)
    with pytest.raises(KPLInputError, match="64"):
        c.get_many(["not-a-key"])
    with pytest.raises(KPLInputError, match="bytes"):
        c.key_for_bytes("a string")
    with pytest.raises(KPLInputError, match="str"):
        c.key_for_text(b"bytes")
    with pytest.raises(KPLInputError, match="non-finite"):
        c.put_many({c.key_for_text("x"): torch.tensor([float("nan")])})
    with pytest.raises(KPLInputError, match="empty"):
        EmbeddingCache("  ")


def test_clear_only_this_namespace():
    a, b = EmbeddingCache("ns-a"), EmbeddingCache("ns-b")
    ka, kb = a.key_for_text("t"), b.key_for_text("t")
    a.put_many({ka: torch.ones(2)})
    b.put_many({kb: torch.ones(2)})
    a.clear()
    assert a.get(ka) is None and b.get(kb) is not None


def test_many_entries_round_trip():
    c = EmbeddingCache(NS)
    keys = [c.key_for_text(f"prompt {i}") for i in range(2000)]
    c.put_many({k: torch.randn(512) for k in keys})
    c2 = EmbeddingCache(NS)
    got = c2.get_many(keys)
    assert len(got) == 2000 and c2.stats.hits == 2000
