"""Shared test fixtures: paths into the real data committed under ``tests/data``, and a temp-file writer.

``tests/data/SOURCES.md`` gives the origin, licence and sha256 of every file there. Tests read real data
through these fixtures (or ``fixtures/streams.py``) only, so a clone of the repository is all they need.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fixtures.data import ARTIFACTS, FINEWEB_SHARD, SMOKE_SHARD, TEST_DATA, TEXT, require


@pytest.fixture(scope="session")
def test_data() -> Path:
    """``tests/data``: the real files the tests read (origins in its SOURCES.md)."""
    return require(TEST_DATA)


@pytest.fixture(scope="session")
def text_dir() -> Path:
    """The Canterbury texts and the first 299,994 bytes of enwik8."""
    return require(TEXT)


@pytest.fixture(scope="session")
def alice_path() -> Path:
    """alice29.txt: 152,089 bytes of ASCII with CRLF line ends."""
    return require(TEXT / "alice29.txt")


@pytest.fixture(scope="session")
def fineweb_shard_path() -> Path:
    """The first 330,001 tokens of fineweb_val_000003.bin, the last official sp1024 validation shard."""
    return require(FINEWEB_SHARD)


@pytest.fixture(scope="session")
def smoke_shard_path() -> Path:
    """smoke_fineweb_val_000000.bin: a small sp1024 shard (131,073 tokens, starts with BOS)."""
    return require(SMOKE_SHARD)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Two trained Parameter Golf artifacts (samtruss_7L384d_c839523, montysteele_6Lx2_adapters_6bit_dc69b08)."""
    return require(ARTIFACTS)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``). On a
    shared 2-core machine OpenMP's spin-waiting made the many small ops of neural tests up to 20x slower
    with two threads (measured: a 1,500-token window pass took 38 s on two threads under load, 2 s on one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, bytes | str], Path]:
    """``write_file(name, data)`` writes bytes (or UTF-8 text) to ``tmp_path / name`` and returns the path."""

    def write(name: str, data: bytes | str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        return path

    return write
