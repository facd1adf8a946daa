"""kplib.paths: one place for locations and defaults, each overridable by an environment variable; errors name the
variable; the cache folder follows platformdirs (XDG_CACHE_HOME) when KPL_CACHE_DIR is unset."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from kplib import paths
from kplib.errors import KPLInputError, StandInWarning

FOLDERS = [("KPL_DATA_ROOT", paths.data_root), ("KPL_DESCRIPTORS_ROOT", paths.descriptors_root),
           ("KPL_TOKENIZER_DIR", paths.tokenizer_dir)]


@pytest.mark.parametrize("var,fn", FOLDERS)
def test_folder_variables_override_the_defaults(monkeypatch, tmp_path, var, fn):
    (tmp_path / "here").mkdir()
    monkeypatch.setenv(var, str(tmp_path / "here"))
    assert fn() == tmp_path / "here"
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(var, "~/here")  # ~ is expanded
    assert fn() == tmp_path / "here"


@pytest.mark.parametrize("var,fn", FOLDERS)
def test_a_missing_folder_names_the_variable(monkeypatch, tmp_path, var, fn):
    monkeypatch.setenv(var, str(tmp_path / "nowhere"))
    with pytest.raises(KPLInputError) as info:
        fn()
    assert var in str(info.value) and "nowhere" in str(info.value)
    (tmp_path / "a file").write_text("x")
    monkeypatch.setenv(var, str(tmp_path / "a file"))  # a file is not a folder
    with pytest.raises(KPLInputError, match=var):
        fn()


def test_tokenizer_dir_not_required_gives_none(monkeypatch, tmp_path):
    monkeypatch.setenv("KPL_TOKENIZER_DIR", str(tmp_path / "nowhere"))
    assert paths.tokenizer_dir(required=False) is None


def test_shared_defaults_only_in_a_source_checkout(monkeypatch):
    for var, _ in FOLDERS:
        monkeypatch.delenv(var, raising=False)
    assert paths.IN_CHECKOUT and paths.SHARED_ROOT == paths.REPO_ROOT.parent / "shared"
    if (paths.SHARED_ROOT / "data").is_dir():
        assert paths.data_root() == paths.SHARED_ROOT / "data"
    monkeypatch.setattr(paths, "SHARED_ROOT", None)  # what an installed wheel sees
    for var, fn in FOLDERS:
        with pytest.raises(KPLInputError) as info:
            fn()
        assert var in str(info.value) and "outside a source checkout" in str(info.value)
    assert paths.tokenizer_dir(required=False) is None


def test_cache_dir_follows_kpl_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("KPL_CACHE_DIR", str(tmp_path / "c"))
    assert paths.cache_dir() == tmp_path / "c"
    assert not (tmp_path / "c").exists()  # created on first write, not when asked
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KPL_CACHE_DIR", "~/c2")
    assert paths.cache_dir() == tmp_path / "c2"


@pytest.mark.skipif(sys.platform != "linux", reason="XDG_CACHE_HOME is the Linux convention")
def test_cache_dir_honours_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("KPL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir() == tmp_path / "xdg" / "kplib"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.cache_dir() == tmp_path / "home" / ".cache" / "kplib"


def test_the_store_writes_into_the_xdg_cache(monkeypatch, tmp_path):
    from kplib.io.store import EmbeddingStore, text_key

    monkeypatch.delenv("KPL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    store = EmbeddingStore({"kind": "text", "model": "m", "embed_dim": 2})
    store.put([text_key("a")], torch.tensor([[1.0, 0.0]]))
    assert store.folder.is_relative_to(paths.cache_dir()) and any((tmp_path / "xdg" / "kplib").rglob("*.npy"))


def test_default_device(monkeypatch):
    monkeypatch.delenv("KPL_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert paths.default_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert paths.default_device() == "cuda"
    monkeypatch.setenv("KPL_DEVICE", "cuda:1")
    assert paths.default_device() == "cuda:1"


def test_default_model(monkeypatch):
    monkeypatch.delenv("KPL_MODEL", raising=False)
    assert paths.default_model() == paths.DEFAULT_MODEL == "openai/clip-vit-large-patch14-336"
    monkeypatch.setenv("KPL_MODEL", "standin")
    assert paths.default_model() == "standin"


def test_load_encoder_uses_kpl_device_and_names_it(monkeypatch):
    from kplib.io.encoders import load_encoder

    monkeypatch.setenv("KPL_DEVICE", "no-such-device")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInWarning)
        with pytest.raises(KPLInputError) as info:
            load_encoder("standin")
    assert "no-such-device" in str(info.value) and "KPL_DEVICE" in str(info.value)


def test_package_data_is_found_through_the_package(monkeypatch, tmp_path):
    """Curated KBs, the dataset registry and the generic descriptions come from inside the package, whatever the
    working directory and environment."""
    from kplib.io import datasets, knowledge

    monkeypatch.chdir(tmp_path)
    for var, _ in FOLDERS:
        monkeypatch.delenv(var, raising=False)
    assert Path(datasets.REGISTRY_FILE).is_relative_to(paths.PACKAGE_ROOT)
    assert "brain_tumor_mri" in knowledge.list_curated()
    assert knowledge.load_kb("brain_tumor_mri").kb_id
    assert knowledge.generic_descriptions("chest X-ray")
