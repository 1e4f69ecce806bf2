"""Shared fixtures: the embedded sample, the real ED splits when ED_DATA_DIR is set, a prepared sample."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainers.data.sources import EMBEDDED_SAMPLE


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return EMBEDDED_SAMPLE


@pytest.fixture(scope="session")
def ed_data_dir() -> Path:
    """The full ED splits (`ED_DATA_DIR`); tests using it skip when it is unset."""
    value = os.environ.get("ED_DATA_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("ED_DATA_DIR is not set to the full EMPATHETIC-DIALOGUES splits")
    return Path(value)


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch for a module of many small models: intra-op threads thrash a shared 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def prepared_sample(tmp_path_factory):
    """The embedded sample prepared once per session (spaCy parse, real vectors)."""
    from trainers.config import DataConfig, load_config
    from trainers.data.prepare import prepare

    cache = tmp_path_factory.mktemp("prepared")
    return prepare(load_config(DataConfig, source="sample", cache_dir=str(cache)))
