"""Shared fixtures: every test gets an isolated cache directory; nothing is written outside tmp_path."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("kpl-cache")
    monkeypatch.setenv("KPL_CACHE_DIR", str(cache))
    return cache
