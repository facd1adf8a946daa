"""kplib.config: one place for locations and defaults, each overridable by an environment variable."""
from __future__ import annotations

import pytest

from kplib import config
from kplib.errors import KPLInputError


def test_default_device_reads_env(monkeypatch):
    monkeypatch.delenv("KPL_DEVICE", raising=False)
    assert config.default_device() == "cpu"
    monkeypatch.setenv("KPL_DEVICE", "cuda:1")
    assert config.default_device() == "cuda:1"


def test_missing_data_root_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("KPL_DATA_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(KPLInputError, match="KPL_DATA_ROOT"):
        config.data_root()


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KPL_CACHE_DIR", str(tmp_path / "c"))
    assert config.cache_dir() == tmp_path / "c"


def test_load_encoder_uses_kpl_device(monkeypatch):
    from kplib.encoders import load_encoder

    monkeypatch.setenv("KPL_DEVICE", "no-such-device")
    with pytest.raises(Exception, match="no-such-device"):
        load_encoder("standin")
