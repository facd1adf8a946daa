"""The embedding store (kplib.io.store): content keys, namespaces, incremental use, atomic shards, damaged files,
read-only and full disks, concurrent writers and merging."""
from __future__ import annotations

import errno
import io
import logging
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kplib.errors import CacheWarning, KPLInputError
from kplib.io import store as store_mod
from kplib.io.store import MAX_SHARDS, EmbeddingStore, content_key, text_key

REPO = Path(__file__).resolve().parents[1]
NS = {"kind": "image", "model": "test/model", "revision": "abc123", "preprocessing": {"size": 224}, "dtype": "float32",
      "embed_dim": 16}


def unit_rows(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def keys_for(n: int, tag: str = "img") -> list[bytes]:
    return [content_key(f"{tag} {i}".encode()) for i in range(n)]


def shards(store: EmbeddingStore) -> list[Path]:
    return sorted(store.folder.glob("*.keys.npy"))


def rows_file(keys_file: Path) -> Path:
    return keys_file.with_name(keys_file.name.replace(".keys.npy", ".rows.npy"))


class Encoder:
    """Deterministic fake encoder that counts what it encodes."""

    def __init__(self):
        self.calls = 0

    def __call__(self, items: list[bytes]) -> torch.Tensor:
        self.calls += len(items)
        return torch.stack([unit_rows(1, seed=int.from_bytes(content_key(b)[:4], "little"))[0] for b in items])


def embed(store: EmbeddingStore, items: list[bytes], enc: Encoder) -> torch.Tensor:
    """What the pipeline does: look up, encode the misses, store them."""
    keys = [content_key(b) for b in items]
    found, rows = store.get(keys)
    miss = torch.nonzero(~found).flatten().tolist()
    if miss:
        new = enc([items[i] for i in miss])
        rows[miss] = new
        store.put([keys[i] for i in miss], new)
    return rows


# --------------------------------------------------------------------------------------------- keys and namespace
def test_keys_are_content_digests():
    assert content_key(b"abc") == content_key(bytearray(b"abc")) != content_key(b"abd")
    assert len(content_key(b"")) == len(text_key("")) == 32
    assert text_key("a photo") != text_key("a photo ") and text_key("é") == text_key("é")
    assert EmbeddingStore.content_key is content_key and EmbeddingStore.text_key is text_key
    with pytest.raises(KPLInputError, match="bytes"):
        content_key("a string")
    with pytest.raises(KPLInputError, match="str"):
        text_key(b"bytes")


def test_namespace_separation(isolated_cache):
    a = EmbeddingStore(NS)
    assert a.folder.parent == isolated_cache and (a.folder / "namespace.json").is_file()
    assert EmbeddingStore(dict(reversed(list(NS.items())))).folder == a.folder      # key order does not matter
    others = [EmbeddingStore({**NS, "revision": "def456"}), EmbeddingStore({**NS, "dtype": "bfloat16"}),
              EmbeddingStore({**NS, "kind": "text"})]
    assert len({a.folder, *(o.folder for o in others)}) == 4
    keys, rows = keys_for(3), unit_rows(3)
    a.put(keys, rows)
    assert torch.equal(a.get(keys)[1], rows)
    for other in others:
        found, got = other.get(keys)
        assert not found.any() and got.shape == (3, 16) and not got.any()


# --------------------------------------------------------------------------------------------- reading and writing
def test_round_trip_in_any_order_with_misses_as_zeros():
    store = EmbeddingStore(NS)
    keys, rows = keys_for(50), unit_rows(50)
    assert store.put(keys, rows) == 50 and store.stats.writes == 50
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(1)).tolist()
    query = [keys[i] for i in perm] + [text_key("not stored"), keys[7]]
    fresh = EmbeddingStore(NS)                            # a new process would build a fresh object
    found, got = fresh.get(query)
    assert found.dtype == torch.bool and found.tolist() == [True] * 50 + [False, True]
    assert got.dtype == torch.float32 and torch.equal(got[:50], rows[perm]) and torch.equal(got[51], rows[7])
    assert not got[50].any()
    assert (fresh.stats.hits, fresh.stats.misses, fresh.stats.damaged) == (51, 1, 0)
    found, got = fresh.get([])
    assert found.shape == (0,) and got.shape == (0, 16)


def test_empty_store_without_embed_dim():
    found, got = EmbeddingStore({"kind": "text", "model": "x"}).get(keys_for(2))
    assert found.tolist() == [False, False] and got.shape[0] == 2 and not got.any()


def test_incremental_ten_new_items_are_ten_misses():
    items = [f"image {i}".encode() for i in range(40)]
    enc = Encoder()
    first = embed(EmbeddingStore(NS), items, enc)
    assert enc.calls == 40
    more = items + [f"new image {i}".encode() for i in range(10)]
    store = EmbeddingStore(NS)
    second = embed(store, more, enc)
    assert enc.calls == 50 and (store.stats.hits, store.stats.misses, store.stats.writes) == (40, 10, 10)
    assert torch.equal(second[:40], first)
    again = EmbeddingStore(NS)
    assert torch.equal(embed(again, more, enc), second) and enc.calls == 50 and again.stats.misses == 0


def test_duplicate_keys_in_one_put_keep_one_row():
    store = EmbeddingStore(NS)
    keys, rows = keys_for(3), unit_rows(4)
    assert store.put([keys[0], keys[1], keys[0], keys[2]], rows) == 3
    found, got = store.get(keys)
    assert found.all() and torch.equal(got, rows[[2, 1, 3]])      # the last row given for a key wins


def test_invalid_inputs():
    store = EmbeddingStore(NS)
    with pytest.raises(KPLInputError, match="32-byte"):
        store.get(["not bytes"])
    with pytest.raises(KPLInputError, match="32-byte"):
        store.get([b"short"])
    with pytest.raises(KPLInputError, match="one row per key"):
        store.put(keys_for(2), unit_rows(3))
    with pytest.raises(KPLInputError, match="finite unit"):
        store.put(keys_for(1), torch.tensor([[float("nan")] * 16]))
    with pytest.raises(KPLInputError, match="finite unit"):
        store.put(keys_for(1), 2 * unit_rows(1))
    with pytest.raises(KPLInputError, match="16-d"):
        store.put(keys_for(1), unit_rows(1, d=8))
    with pytest.raises(KPLInputError, match="namespace"):
        EmbeddingStore({})


# --------------------------------------------------------------------------------------------- files
def test_shards_are_plain_npy_and_writes_leave_no_temporary_files():
    store = EmbeddingStore(NS)
    keys, rows = keys_for(20), unit_rows(20)
    store.put(keys, rows)
    (k,) = shards(store)
    stored_keys, stored_rows = np.load(k), np.load(rows_file(k))
    assert stored_keys.dtype == np.uint8 and stored_keys.shape == (20, 32)
    assert stored_rows.dtype == np.float32 and stored_rows.shape == (20, 16)
    order = [stored_keys.tobytes()[32 * i:32 * i + 32] for i in range(20)]
    assert order == sorted(keys)                                   # sorted by key bytes
    assert np.array_equal(stored_rows, rows[[keys.index(x) for x in order]].numpy())
    assert sorted(p.name for p in store.folder.iterdir() if p.suffix != ".npy") == ["namespace.json"]


def test_merging_keeps_the_file_count_small_and_loses_nothing():
    store = EmbeddingStore(NS)
    keys, rows = keys_for(400), unit_rows(400)
    for i in range(0, 400, 10):                                    # 40 puts of 10
        store.put(keys[i:i + 10], rows[i:i + 10])
        assert len(shards(store)) <= MAX_SHARDS
    assert len(list(store.folder.iterdir())) <= 2 * MAX_SHARDS + 1
    store.put(keys[:5], rows[:5])                                  # stored again: still one row per key after merges
    found, got = EmbeddingStore(NS).get(keys)
    assert found.all() and torch.equal(got, rows)


def test_sweep_removes_stale_leftovers_of_killed_writers(monkeypatch):
    store = EmbeddingStore(NS)
    stale_tmp = store.folder / ".x.rows.npy.abc.tmp"
    orphan = store.folder / "00000000000000000001-1-deadbeef.rows.npy"
    fresh_tmp = store.folder / ".y.rows.npy.def.tmp"
    for p in (stale_tmp, orphan, fresh_tmp):
        p.write_bytes(b"partial")
    for p in (stale_tmp, orphan):
        os.utime(p, (0, 0))
    keys, rows = keys_for(10 * (MAX_SHARDS + 1)), unit_rows(10 * (MAX_SHARDS + 1))
    for i in range(0, len(keys), 10):
        store.put(keys[i:i + 10], rows[i:i + 10])                  # the last put merges, then sweeps
    assert not stale_tmp.exists() and not orphan.exists() and fresh_tmp.exists()
    assert torch.equal(EmbeddingStore(NS).get(keys)[1], rows)


# --------------------------------------------------------------------------------------------- damage
def _damage_truncate(k: Path) -> None:
    r = rows_file(k)
    r.write_bytes(r.read_bytes()[:-50])


def _damage_header(k: Path) -> None:
    r = rows_file(k)
    blob = bytearray(r.read_bytes())
    pos = blob.index(b"shape") + 10                                # a digit of the shape (or the tuple syntax)
    blob[pos] ^= 0x5A
    r.write_bytes(bytes(blob))


def _damage_magic(k: Path) -> None:
    blob = bytearray(k.read_bytes())
    blob[1] ^= 0x01
    k.write_bytes(bytes(blob))


def _damage_nan(k: Path) -> None:
    r = rows_file(k)
    blob = bytearray(r.read_bytes())
    blob[-64:] = np.full(16, np.nan, np.float32).tobytes()        # the last row becomes NaN
    r.write_bytes(bytes(blob))


def _damage_scale(k: Path) -> None:
    r = rows_file(k)
    arr = np.load(r)
    arr[3] *= 1.01                                                 # finite but not a unit vector
    np.save(r, arr)


def _damage_extra_bytes(k: Path) -> None:
    with open(rows_file(k), "ab") as fh:
        fh.write(b"\0" * 64)


def _damage_row_count(k: Path) -> None:
    np.save(k, np.load(k)[:-1])                                    # keys and rows disagree


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_header, _damage_magic, _damage_nan, _damage_scale,
                                    _damage_extra_bytes, _damage_row_count])
def test_damaged_shard_is_detected_logged_dropped_and_recomputed(damage, caplog):
    items = [f"image {i}".encode() for i in range(12)]
    enc = Encoder()
    reference = embed(EmbeddingStore(NS), items, enc)
    (k,) = shards(EmbeddingStore(NS))
    damage(k)
    store = EmbeddingStore(NS)
    with caplog.at_level(logging.WARNING, logger="kplib"):
        again = embed(store, items, enc)
    assert torch.equal(again, reference)                           # recomputed, never the damaged values
    assert store.stats.damaged == 1 and store.stats.misses == 12 and enc.calls == 24
    assert any("damaged embedding shard" in r.getMessage() and k.name[:20] in r.getMessage() for r in caplog.records)
    assert k not in shards(store)                                   # dropped; the recomputed rows are stored again
    third = EmbeddingStore(NS)
    assert torch.equal(embed(third, items, enc), reference) and third.stats.hits == 12 and enc.calls == 24


def test_damaged_newest_shard_falls_back_to_an_older_copy():
    store = EmbeddingStore(NS)
    keys, rows = keys_for(6), unit_rows(6)
    store.put(keys, rows)
    store.put(keys[:2], rows[:2])                                  # a newer shard holding two of them again
    newest = shards(store)[-1]
    _damage_nan(newest)
    fresh = EmbeddingStore(NS)
    found, got = fresh.get(keys)
    assert found.all() and torch.equal(got, rows) and fresh.stats.damaged == 1


# --------------------------------------------------------------------------------------------- faults
def _read_only(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(store_mod.tempfile, "mkstemp", refuse)


class _FullDisk(io.RawIOBase):
    """A file whose writes fail with ENOSPC after a few bytes (the disk fills in the middle of a shard)."""

    def __init__(self, fd: int):
        self.fd, self.n = fd, 0

    def writable(self):
        return True

    def write(self, b):
        if self.n + len(b) > 100:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.write(self.fd, bytes(b))
        self.n += len(b)
        return len(b)

    def close(self):
        if not self.closed:
            os.close(self.fd)
        super().close()


def _full_disk(monkeypatch):
    real = os.fdopen
    monkeypatch.setattr(store_mod.os, "fdopen",
                        lambda fd, mode="r", *a, **k: _FullDisk(fd) if "w" in mode else real(fd, mode, *a, **k))


@pytest.mark.parametrize("fault, words", [(_read_only, "Read-only file system"),
                                          (_full_disk, "No space left on device")], ids=["read-only", "full"])
def test_unwritable_store_warns_once_and_results_stay_right(monkeypatch, caplog, fault, words):
    items = [f"image {i}".encode() for i in range(30)]
    enc = Encoder()
    reference = embed(EmbeddingStore(NS), items[:10], enc)         # some embeddings stored before the fault
    fault(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)               # all hits: nothing to write, nothing to say
        assert torch.equal(embed(EmbeddingStore(NS), items[:10], enc), reference)
    store = EmbeddingStore(NS)
    caplog.set_level(logging.WARNING, logger="kplib")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first = embed(store, items, enc)
        second = embed(store, items, enc)
    cache_warnings = [w for w in seen if issubclass(w.category, CacheWarning)]
    assert len(cache_warnings) == 1 and words in str(cache_warnings[0].message)
    assert "KPL_CACHE_DIR" in str(cache_warnings[0].message)
    assert torch.equal(first[:10], reference) and torch.equal(first, second)
    assert torch.equal(first, Encoder()(items))                  # what an encoding without a store gives
    assert store.stats.hits == 20 and store.stats.writes == 0 and not store.writable   # reads still served
    assert enc.calls == 10 + 20 + 20 and store.stats.misses == 40
    assert [p for p in store.folder.iterdir() if p.name.endswith(".tmp")] == []         # nothing half-written


def test_uncreatable_folder_warns_and_still_works(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.warns(CacheWarning, match="embedding store is off"):
        store = EmbeddingStore(NS, root=blocker / "cache")
    enc = Encoder()
    items = [b"a", b"b"]
    assert embed(store, items, enc).shape == (2, 16)
    assert embed(store, items, enc).shape == (2, 16) and enc.calls == 4


def test_real_read_only_folder(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions (the monkeypatched read-only test covers this)")
    items = [f"image {i}".encode() for i in range(5)]
    enc = Encoder()
    reference = embed(EmbeddingStore(NS, root=tmp_path), items, enc)
    folder = EmbeddingStore(NS, root=tmp_path).folder
    folder.chmod(0o555)
    try:
        store = EmbeddingStore(NS, root=tmp_path)
        with pytest.warns(CacheWarning):
            got = embed(store, items + [b"new"], enc)
        assert torch.equal(got[:5], reference) and store.stats.hits == 5
    finally:
        folder.chmod(0o755)


WRITER = textwrap.dedent("""
    import sys, torch
    from kplib.io.store import EmbeddingStore, content_key
    ns, tag, root = eval(sys.argv[1]), sys.argv[2], sys.argv[3]
    store = EmbeddingStore(ns, root=root)
    for i in range(40):
        keys = [content_key(f"{tag} {i} {j}".encode()) for j in range(10)]
        g = torch.Generator().manual_seed(ord(tag) * 1000 + i)
        store.put(keys, torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1))
""")


def test_concurrent_writers_lose_nothing(tmp_path):
    """Two processes put 400 rows each at the same time (with merges racing): every row can be read back."""
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, repr(NS), tag, str(tmp_path)], cwd=REPO, env=env,
                              stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    for p in procs:
        err = p.communicate(timeout=600)[1]
        assert p.returncode == 0, err[-2000:]
    store = EmbeddingStore(NS, root=tmp_path)
    for tag in ("a", "b"):
        for i in range(40):
            keys = [content_key(f"{tag} {i} {j}".encode()) for j in range(10)]
            found, got = store.get(keys)
            g = torch.Generator().manual_seed(ord(tag) * 1000 + i)
            assert found.all(), (tag, i)
            assert torch.equal(got, torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1))
    assert len(shards(store)) <= 2 * MAX_SHARDS and store.stats.damaged == 0


KILLED = textwrap.dedent("""
    import sys, torch
    from kplib.io.store import EmbeddingStore, content_key
    store = EmbeddingStore(eval(sys.argv[1]), root=sys.argv[2])
    for i in range(1_000_000):
        g = torch.Generator().manual_seed(i)
        store.put([content_key(f"item {i}".encode())], torch.nn.functional.normalize(torch.randn(1, 16, generator=g)))
        print(i, flush=True)
""")


def test_sigkill_while_writing_leaves_only_whole_shards(tmp_path):
    """A process putting (and merging) as fast as it can is SIGKILLed: every row left behind is exact, or absent."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", KILLED, repr(NS), str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    try:
        for line in proc.stdout:
            if int(line) >= 60:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    store = EmbeddingStore(NS, root=tmp_path)
    keys = [content_key(f"item {i}".encode()) for i in range(200)]
    found, got = store.get(keys)
    assert store.stats.damaged == 0 and found[:60].all()          # everything reported written is there
    for i in torch.nonzero(found).flatten().tolist():
        g = torch.Generator().manual_seed(i)
        assert torch.equal(got[i], torch.nn.functional.normalize(torch.randn(1, 16, generator=g))[0]), i
    store.put(keys[-1:], unit_rows(1))                             # and the store keeps working
    assert torch.equal(EmbeddingStore(NS, root=tmp_path).get(keys[-1:])[1], unit_rows(1))


def test_large_lookups_split_over_threads_give_the_same_rows():
    n = 5 * store_mod._CHUNK * store_mod._THREADS                 # above the threshold for splitting the queries
    ns = {**NS, "embed_dim": 8}
    keys, rows = keys_for(n), unit_rows(n, d=8, seed=3)
    store = EmbeddingStore(ns)
    store.put(keys[: n // 2], rows[: n // 2])
    store.put(keys[n // 2:], rows[n // 2:])                        # two shards
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(4)).tolist()
    query = [keys[i] for i in perm] + keys_for(7, tag="absent")
    found, got = EmbeddingStore(ns).get(query)
    assert found[:n].all() and not found[n:].any()
    assert torch.equal(got[:n], rows[perm]) and not got[n:].any()
    (first, _) = shards(store)
    _damage_nan(first)                                             # a damaged shard is found in any thread's part
    fresh = EmbeddingStore(ns)
    found, got = fresh.get(query)
    assert fresh.stats.damaged == 1 and int(found.sum()) == n - n // 2
