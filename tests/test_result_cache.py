"""Tests of the method-result cache: kplib.cache.ResultCache and kplib.experiment.cached_run_method.

A hit must equal a fresh computation, any change of an input, the config, the method or kplib's code must miss,
damaged entries are detected before anything is deserialised, and nothing is written outside KPL_CACHE_DIR.
"""
from __future__ import annotations

import copy
import dataclasses
import errno
import warnings
from pathlib import Path

import pytest
import torch

from kplib import cache as cache_mod
from kplib import methods
from kplib.cache import RESULT_FOLDER, RESULT_SUFFIX, CacheWarning, ResultCache
from kplib.errors import CacheError, KPLInputError
from kplib.experiment import cached_run_method
from kplib.methods import KPLConfig, MethodResult, run_method
from kplib.proxy import ProxyLearningResult
from kplib.simulate import make_world
from kplib.transport import TransportResult

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {"iters_proxy": 60}   # short proxy learning keeps every test well under a second


@pytest.fixture
def world():
    return make_world(n_images=40, n_classes=3, dim=16, n_descriptions=5, seed=0)


@pytest.fixture
def calls(monkeypatch):
    """Count calls of methods.run_method (cached_run_method must call it on a miss only)."""
    seen: list[str] = []
    real = methods.run_method

    def counting(method, *args, **kwargs):
        seen.append(method)
        return real(method, *args, **kwargs)

    monkeypatch.setattr(methods, "run_method", counting)
    return seen


def assert_same_result(a: MethodResult, b: MethodResult) -> None:
    """Every field except timings/meta equal: tensors bit for bit (dtype too), nested dataclasses field by field."""
    def same(x, y, where):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
        elif dataclasses.is_dataclass(x):
            assert type(x) is type(y), where
            for f in dataclasses.fields(x):
                same(getattr(x, f.name), getattr(y, f.name), f"{where}.{f.name}")
        elif isinstance(x, (list, tuple)):
            assert type(x) is type(y) and len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}[{i}]")
        else:
            assert x == y, f"{where}: {x!r} != {y!r}"

    for f in dataclasses.fields(MethodResult):
        if f.name not in ("timings", "meta"):
            same(getattr(a, f.name), getattr(b, f.name), f.name)


def entries(root: Path) -> list[Path]:
    return sorted((root / RESULT_FOLDER).rglob(f"*{RESULT_SUFFIX}"))


# ------------------------------------------------------------------------------------------------ hits and misses
@pytest.mark.parametrize("method", methods.METHODS)
def test_hit_equals_a_fresh_computation_and_is_marked(world, method, isolated_cache):
    X, text = world.image_embeddings, world.text
    first = cached_run_method(method, X, text, **FAST)
    info = first.meta["result_cache"]
    assert info["hit"] is False and info["stored"] is True and len(info["key"]) == 16
    assert len(entries(isolated_cache)) == 1
    second = cached_run_method(method, X, text, **FAST)
    assert second.meta["result_cache"] == {"hit": True, "key": info["key"],
                                           "computed_seconds": first.timings["total"], "stored": True}
    assert second.timings == first.timings          # timings of the run that computed it, not of this call
    fresh = run_method(method, X, text, **FAST)
    assert_same_result(second, fresh)
    assert second.config == fresh.config and second.class_names == fresh.class_names
    if method in ("inmap", "kpl_reference", "kpl_corrected"):   # the learned parts really came back
        assert isinstance(second.transport, TransportResult)
        assert isinstance(second.proxy_learning, ProxyLearningResult)
        assert second.proxies is not None and second.pseudo_labels_final is not None


def test_second_call_does_not_call_run_method(world, calls):
    X, text = world.image_embeddings, world.text
    cached_run_method("kpl_reference", X, text, **FAST)
    assert calls == ["kpl_reference"]
    again = cached_run_method("kpl_reference", X.clone(), copy.deepcopy(text), KPLConfig(**FAST))
    assert calls == ["kpl_reference"]                # equal content (fresh objects, config or overrides): a hit
    assert again.meta["result_cache"]["hit"] is True


def _bump_x(w):
    X = w.image_embeddings.clone()
    X[3, 5] = torch.nextafter(X[3, 5], torch.tensor(2.0))   # one element, one ulp
    return X, w.text, "kpl_reference", {}


def _bump_description(w):
    text = copy.deepcopy(w.text)
    d = text.description_embeddings[1].clone()
    d[2, 0] = torch.nextafter(d[2, 0], torch.tensor(2.0))
    text.description_embeddings[1] = d
    return w.image_embeddings, text, "kpl_reference", {}


def _rename_class(w):
    text = copy.deepcopy(w.text)
    text.class_names[0] = text.class_names[0] + "_renamed"
    return w.image_embeddings, text, "kpl_reference", {}


def _edit_description_text(w):
    text = copy.deepcopy(w.text)
    text.descriptions[0][0] += "."
    return w.image_embeddings, text, "kpl_reference", {}


def _edit_meta(w):
    text = copy.deepcopy(w.text)
    text.meta["kb"] = "another kb"
    return w.image_embeddings, text, "kpl_reference", {}


def _bump_name_embedding(w):
    text = copy.deepcopy(w.text)
    e = text.name_embeddings.clone()
    e[0, 0, 0] = torch.nextafter(e[0, 0, 0], torch.tensor(2.0))
    text.name_embeddings = e
    return w.image_embeddings, text, "kpl_reference", {}


MUTATIONS = {
    "x_one_element": _bump_x,
    "one_description_embedding": _bump_description,
    "class_name": _rename_class,
    "description_text": _edit_description_text,
    "text_meta": _edit_meta,
    "name_embedding": _bump_name_embedding,
    "config_k": lambda w: (w.image_embeddings, w.text, "kpl_reference", {"k": 4}),
    "config_tau_t": lambda w: (w.image_embeddings, w.text, "kpl_reference", {"tau_t": 0.02}),
    "method": lambda w: (w.image_embeddings, w.text, "kpl_corrected", {}),
    "x_dtype": lambda w: (w.image_embeddings.double(), w.text, "kpl_reference", {}),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_any_change_misses_and_gives_the_fresh_result(world, calls, mutation):
    cached_run_method("kpl_reference", world.image_embeddings, world.text, **FAST)
    X, text, method, overrides = MUTATIONS[mutation](world)
    result = cached_run_method(method, X, text, **FAST, **overrides)
    assert result.meta["result_cache"]["hit"] is False, mutation
    assert calls == ["kpl_reference", method]
    assert_same_result(result, run_method(method, X, text, **FAST, **overrides))


def test_edited_library_code_misses(world, calls, monkeypatch):
    cached_run_method("inmap", world.image_embeddings, world.text, **FAST)
    assert len(cache_mod.code_digest()) == 64
    monkeypatch.setattr(cache_mod, "code_digest", lambda: "0" * 64)
    assert cached_run_method("inmap", world.image_embeddings, world.text, **FAST).meta["result_cache"]["hit"] is False
    assert calls == ["inmap", "inmap"]


def test_code_digest_covers_every_kplib_source_file(monkeypatch, tmp_path):
    import kplib

    monkeypatch.setattr(cache_mod, "_CODE_DIGEST", None)   # computed once per process: recompute from today's files
    before = cache_mod.code_digest()
    pkg = Path(kplib.__file__).parent
    fake = tmp_path / "kplib"
    fake.mkdir()
    for p in pkg.glob("*.py"):
        (fake / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(cache_mod, "__file__", str(fake / "cache.py"))
    monkeypatch.setattr(cache_mod, "_CODE_DIGEST", None)
    assert cache_mod.code_digest() == before                        # same bytes, same digest
    (fake / "proxy.py").write_bytes((fake / "proxy.py").read_bytes() + b"\n# edited\n")
    monkeypatch.setattr(cache_mod, "_CODE_DIGEST", None)
    assert cache_mod.code_digest() != before


def test_cache_false_always_computes_and_writes_nothing(world, calls, isolated_cache):
    for _ in range(2):
        r = cached_run_method("inmap", world.image_embeddings, world.text, cache=False, **FAST)
        assert r.meta["result_cache"] == {"hit": False, "key": None, "computed_seconds": r.timings["total"],
                                          "stored": False}
    assert calls == ["inmap", "inmap"] and entries(isolated_cache) == []


# ------------------------------------------------------------------------------------------------ damaged entries
def _flip_payload_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[-20] ^= 0x01
    path.write_bytes(bytes(blob))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _overwrite_magic(path: Path) -> None:
    path.write_bytes(b"garbage!" + path.read_bytes()[8:])


@pytest.mark.parametrize("damage", [_flip_payload_byte, _truncate, _overwrite_magic], ids=lambda f: f.__name__[1:])
def test_damaged_entry_is_detected_logged_and_recomputed(world, calls, isolated_cache, caplog, damage):
    X, text = world.image_embeddings, world.text
    cached_run_method("kpl_reference", X, text, **FAST)
    (path,) = entries(isolated_cache)
    damage(path)
    with caplog.at_level("WARNING", logger="kplib"):
        result = cached_run_method("kpl_reference", X, text, **FAST)
    assert "corrupt result-cache entry" in caplog.text
    assert result.meta["result_cache"]["hit"] is False and result.meta["result_cache"]["stored"] is True
    assert calls == ["kpl_reference", "kpl_reference"]
    assert_same_result(result, run_method("kpl_reference", X, text, **FAST))
    assert cached_run_method("kpl_reference", X, text, **FAST).meta["result_cache"]["hit"] is True  # rewritten


def test_damaged_entry_counted_and_deleted(world):
    store = ResultCache()
    key = "ab" * 32
    result = run_method("zero_shot", world.image_embeddings, world.text)
    assert store.put(key, result) and store.stats.writes == 1
    _flip_payload_byte(store.entry_path(key))
    assert store.get(key) is None
    assert store.stats.corrupt == 1 and store.stats.misses == 1 and not store.entry_path(key).exists()


FIRED: list[int] = []


def _fire() -> int:
    FIRED.append(1)
    return 1


class _Trap:
    """Unpickling this object would call ``_fire`` (a module-level function): a safe loader must refuse it."""

    def __reduce__(self):
        return (_fire, ())


def test_verified_entry_with_foreign_globals_is_refused_not_executed(world, calls, isolated_cache, caplog):
    X, text = world.image_embeddings, world.text
    cached_run_method("zero_shot", X, text)
    (path,) = entries(isolated_cache)
    key = path.stem
    # a correctly checksummed entry whose payload would call code when unpickled without weights_only
    path.write_bytes(ResultCache._encode(key, {"x": _Trap()}))
    FIRED.clear()
    with caplog.at_level("WARNING", logger="kplib"):
        result = cached_run_method("zero_shot", X, text)
    assert FIRED == [] and "does not load safely" in caplog.text
    assert result.meta["result_cache"]["hit"] is False and calls == ["zero_shot", "zero_shot"]
    assert_same_result(result, run_method("zero_shot", X, text))


def test_entry_of_another_key_is_not_served(world, isolated_cache, caplog):
    X, text = world.image_embeddings, world.text
    a = cached_run_method("zero_shot", X, text)
    b = cached_run_method("descriptor_mean", X, text)
    pa, pb = (next(p for p in entries(isolated_cache) if p.stem.startswith(r.meta["result_cache"]["key"]))
              for r in (a, b))
    pa.write_bytes(pb.read_bytes())                 # a valid entry in the wrong place
    with caplog.at_level("WARNING", logger="kplib"):
        again = cached_run_method("zero_shot", X, text)
    assert "another key" in caplog.text and again.method == "zero_shot"
    assert again.meta["result_cache"]["hit"] is False


# ------------------------------------------------------------------------------------------------ unusable folder
def test_uncreatable_cache_dir_warns_and_computes(world, calls, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("KPL_CACHE_DIR", str(blocker / "cache"))
    with pytest.warns(CacheWarning, match="method-result cache is off"):
        result = cached_run_method("kpl_reference", world.image_embeddings, world.text, **FAST)
    assert result.meta["result_cache"]["hit"] is False and result.meta["result_cache"]["stored"] is False
    assert_same_result(result, run_method("kpl_reference", world.image_embeddings, world.text, **FAST))
    with warnings.catch_warnings(record=True) as rec:   # once per process and folder, not at every call
        warnings.simplefilter("always")
        cached_run_method("kpl_reference", world.image_embeddings, world.text, **FAST)
    assert not [w for w in rec if issubclass(w.category, CacheWarning)]
    assert calls == ["kpl_reference", "kpl_reference"]
    with pytest.raises(CacheError, match="KPL_CACHE_DIR"):
        ResultCache(strict=True)


def test_unwritable_cache_dir_warns_and_leaves_no_partial_entry(world, isolated_cache, monkeypatch):
    def denied(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cache_mod.os, "replace", denied)
    with pytest.warns(CacheWarning, match="Permission denied"):
        result = cached_run_method("inmap", world.image_embeddings, world.text, **FAST)
    assert result.meta["result_cache"]["stored"] is False
    assert_same_result(result, run_method("inmap", world.image_embeddings, world.text, **FAST))
    assert [p for p in isolated_cache.rglob("*") if p.is_file()] == []   # temp file removed


# ------------------------------------------------------------------------------------------------ validation, hygiene
@pytest.mark.parametrize("args, overrides", [
    (("kpl",), {"kk": 3}),
    (("kpl",), {"k": 0}),
    (("zero_shot",), {"tau_t": -1.0}),
    (("no_such_method",), {}),
    (("kpl", {"k": 3}), {}),
])
def test_invalid_arguments_raise_exactly_like_run_method(world, args, overrides, isolated_cache):
    method, *config = args
    with pytest.raises(KPLInputError) as expected:
        run_method(method, world.image_embeddings, world.text, *config, **overrides)
    with pytest.raises(KPLInputError) as got:
        cached_run_method(method, world.image_embeddings, world.text, *config, **overrides)
    assert str(got.value) == str(expected.value)
    assert entries(isolated_cache) == []


def test_invalid_inputs_raise_like_run_method_and_are_not_stored(world, isolated_cache):
    X = world.image_embeddings.clone()
    X[0, 0] = float("nan")
    with pytest.raises(KPLInputError, match="NaN") as got:
        cached_run_method("inmap", X, world.text, **FAST)
    with pytest.raises(KPLInputError) as expected:
        run_method("inmap", X, world.text, **FAST)
    assert str(got.value) == str(expected.value)
    with pytest.raises(KPLInputError, match="TextEmbeddings"):
        cached_run_method("inmap", world.image_embeddings, {"not": "text"})
    assert entries(isolated_cache) == []


def test_nothing_written_outside_the_cache_dir(world, isolated_cache, tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    for method in ("zero_shot", "kpl_reference"):
        for _ in range(2):
            cached_run_method(method, world.image_embeddings, world.text, **FAST)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    written = [p for p in isolated_cache.rglob("*") if p.is_file()]
    assert len(written) == 2 and all(p.suffix == RESULT_SUFFIX for p in written)
    assert all(p.relative_to(isolated_cache).parts[0] == RESULT_FOLDER for p in written)
