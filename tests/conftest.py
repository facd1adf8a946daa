"""Shared fixtures: every test gets an isolated cache directory; nothing is written outside tmp_path."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("kpl-cache")
    monkeypatch.setenv("KPL_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def one_torch_thread():
    """Tiny matrices: one torch thread (two threads on a busy 2-core machine were measured ~50x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
