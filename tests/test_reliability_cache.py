"""Reliability (issue 7): the embedding cache under faults, end to end through ``embed_dataset`` / ``kpl encode``
with the stand-in — killed mid-write (simulated, and a real SIGKILL), corrupted bytes, a stale entry for changed
image bytes, a read-only or full cache directory. The rule: recomputed or clearly reported, never silently wrong —
checked by comparing with a cache-free encoding, value for value. Entry-format unit tests are in test_cache.py.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kplib import cache as cache_mod
from kplib.cache import SUFFIX, CacheWarning, EmbeddingCache
from kplib.encoders import load_encoder
from kplib.errors import CacheError, StandInWarning
from kplib.experiment import _image_namespace, embed_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def standin():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        return load_encoder("standin")


def make_folder(root: Path, per_class: int = 4) -> Path:
    rng = np.random.default_rng(5)
    for c, name in enumerate(("left", "right")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"im_{i}.png")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data")


@pytest.fixture
def reference(folder, standin):
    """Cache-free embeddings of the folder (the truth every cached run must equal exactly)."""
    return embed_dataset(folder, standin, cache=False, progress=False)


def entries(cache_root: Path) -> list[Path]:
    return sorted(cache_root.rglob(f"*{SUFFIX}"))


def same(a, b) -> bool:
    """Same rows in the same order. Re-encoded rows may differ from the reference in the last float bits (a batch
    of 1 vs a batch of 8 sums in another order: measured |diff| < 1e-6); a wrong value differs by ~0.1."""
    return a.paths == b.paths and torch.allclose(a.embeddings, b.embeddings, rtol=0, atol=1e-5)


def test_leftover_temp_file_and_truncated_entry_after_a_crash(folder, standin, reference, isolated_cache, caplog):
    first = embed_dataset(folder, standin, progress=False)
    assert same(first, reference) and first.cache_stats["writes"] == 8
    files = entries(isolated_cache)
    assert len(files) == 8
    # what a crash can leave: a temp file next to the entries (os.replace never ran) and - from a non-atomic
    # writer or a damaged disk - a truncated entry
    tmp = files[0].parent / f".{files[0].name}.abc123.tmp"
    tmp.write_bytes(files[0].read_bytes()[:37])
    truncated = files[1]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    caplog.set_level(logging.WARNING, logger="kplib")
    second = embed_dataset(folder, standin, progress=False)
    assert same(second, reference)
    s = second.cache_stats
    assert (s["hits"], s["corrupt"], s["n_encoded"]) == (7, 1, 1)
    assert any("corrupt cache entry" in r.getMessage() and str(truncated) in r.getMessage() for r in caplog.records)
    third = embed_dataset(folder, standin, progress=False)    # the recomputed entry was stored again
    assert same(third, reference) and third.cache_stats["hits"] == 8


KILL_CHILD = textwrap.dedent("""
    import sys, torch
    from kplib.cache import EmbeddingCache
    c = EmbeddingCache("reliability-kill-test")
    for i in range(1_000_000):
        g = torch.Generator().manual_seed(i)
        c.put_many({c.key_for_text(f"item {i}"): torch.randn(512, generator=g)})
        if i % 50 == 0:
            print(i, flush=True)
""")


def test_real_sigkill_while_writing_many_entries(isolated_cache):
    """A child writes entries as fast as it can and is SIGKILLed mid-stream: every entry left behind is complete
    and exact, or absent — never a damaged or wrong value."""
    env = dict(os.environ, KPL_CACHE_DIR=str(isolated_cache))
    proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD], stdout=subprocess.PIPE, text=True, env=env,
                            cwd=REPO)
    try:
        for line in proc.stdout:
            if int(line) >= 300:
                break
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    cache = EmbeddingCache("reliability-kill-test")
    written = len(entries(cache.folder))
    assert written >= 300
    keys = [cache.key_for_text(f"item {i}") for i in range(written + 200)]
    found = cache.get_many(keys)
    assert cache.stats.corrupt == 0
    assert len(found) >= written - 1          # at most the entry being renamed at the kill is missing
    for i, k in enumerate(keys):
        if k in found:
            expected = torch.randn(512, generator=torch.Generator().manual_seed(i))
            assert torch.equal(found[k], expected), f"entry {i} has wrong values"
    # the cache keeps working after the crash (leftover temp files are harmless)
    cache.put_many({keys[-1]: torch.ones(3)})
    assert torch.equal(cache.get(keys[-1]), torch.ones(3))


@pytest.mark.parametrize("where", ["payload", "header", "magic"])
def test_corrupted_bytes_are_recomputed_not_returned(folder, standin, reference, isolated_cache, where):
    embed_dataset(folder, standin, progress=False)
    damaged = entries(isolated_cache)[::3]
    for f in damaged:
        blob = bytearray(f.read_bytes())
        pos = {"payload": len(blob) - 7, "header": 20, "magic": 2}[where]
        blob[pos] ^= 0x5A
        f.write_bytes(bytes(blob))
    again = embed_dataset(folder, standin, progress=False)
    assert same(again, reference)
    assert again.cache_stats["corrupt"] == len(damaged) and again.cache_stats["n_encoded"] == len(damaged)


def test_stale_entry_for_changed_image_bytes(folder, standin, isolated_cache):
    """An image edited in place — same name, same size, and even the old mtime restored — is re-encoded."""
    before = embed_dataset(folder, standin, progress=False)
    target = folder / "left" / "im_2.png"
    st = target.stat()
    arr = np.asarray(Image.open(target)).copy()
    arr[:10] = 255 - arr[:10]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    target.write_bytes(buf.getvalue())
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    fresh = embed_dataset(folder, standin, cache=False, progress=False)
    cached = embed_dataset(folder, standin, progress=False)
    assert same(cached, fresh)
    assert cached.cache_stats["hits"] == 7 and cached.cache_stats["n_encoded"] == 1
    i = cached.paths.index(str(target))
    assert not torch.equal(cached.embeddings[i], before.embeddings[i])   # not the stale value
    assert torch.equal(torch.cat([cached.embeddings[:i], cached.embeddings[i + 1:]]),
                       torch.cat([before.embeddings[:i], before.embeddings[i + 1:]]))


class _FullDisk(io.RawIOBase):
    """A file object whose writes fail with ENOSPC after a few bytes (the disk fills mid-entry)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.n = 0

    def writable(self):
        return True

    def write(self, b):
        if self.n + len(b) > 40:
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
    monkeypatch.setattr(cache_mod.os, "fdopen", lambda fd, mode="r", *a, **k:
                        _FullDisk(fd) if "w" in mode else real(fd, mode, *a, **k))


def _read_only(monkeypatch):
    def refuse(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(cache_mod.tempfile, "mkstemp", refuse)


@pytest.mark.parametrize("existing", [False, True], ids=["new-cache-dir", "used-cache-dir"])
@pytest.mark.parametrize("fault, words", [(_full_disk, "No space left on device|disk full"),
                                          (_read_only, "Read-only file system")], ids=["full", "read-only"])
def test_full_or_read_only_cache_dir_is_reported_and_results_are_right(folder, standin, reference, isolated_cache,
                                                                       monkeypatch, fault, words, existing, caplog):
    if existing:  # the namespace folder exists from earlier runs: the fault hits the entry writes
        EmbeddingCache(_image_namespace(standin))
    fault(monkeypatch)
    caplog.set_level(logging.WARNING, logger="kplib")
    with pytest.warns(CacheWarning, match=words):
        emb = embed_dataset(folder, standin, progress=False)
    assert same(emb, reference)
    assert emb.cache_stats["writes"] == 0
    assert emb.cache_stats["write_errors"] == (1 if existing else 0)   # writing stops at the first failure
    off = [r.getMessage() for r in caplog.records if "embedding cache is off" in r.getMessage()]
    assert len(off) == 1 and "KPL_CACHE_DIR" in off[0]                 # said once (not 8 times), with the fix
    # nothing half-written stays behind
    assert entries(isolated_cache) == []
    assert [p for p in isolated_cache.rglob("*.tmp")] == []


def test_full_cache_dir_through_the_cli(folder, isolated_cache, monkeypatch, capsys):
    from kplib.cli import main

    _full_disk(monkeypatch)
    rc = main(["encode", str(folder), "--model", "standin", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "8 images" in out and "0 written" in out
    assert "embedding cache is off" in err and "No space left on device" in err and "KPL_CACHE_DIR" in err


def test_read_only_cache_still_serves_verified_hits(folder, standin, reference, isolated_cache, monkeypatch):
    embed_dataset(folder, standin, progress=False)
    _read_only(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)   # all hits: nothing to write, nothing to warn about
        emb = embed_dataset(folder, standin, progress=False)
    assert same(emb, reference) and emb.cache_stats["hits"] == 8


def test_strict_cache_raises_a_clear_error(isolated_cache, monkeypatch):
    _full_disk(monkeypatch)
    with pytest.raises(CacheError, match=r"disk full.*KPL_CACHE_DIR"):
        c = EmbeddingCache("strict-test", strict=True)
        c.put_many({c.key_for_text("x"): torch.ones(4)})
