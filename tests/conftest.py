"""Shared test fixtures: paths into the real data beside the checkout, and a temp-file writer.

The real data lives in ``../shared/data`` next to the repository (see its README.md for the origin of
every file). Tests read it through these fixtures only; the package itself never does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _require(path: Path) -> Path:
    # Fail (never skip): a suite that silently skips its real-data tests proves nothing.
    if not path.exists():
        raise FileNotFoundError(f"test data missing: {path} (expected ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (fails clearly if it is missing)."""
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def text_dir(shared_data: Path) -> Path:
    """The Canterbury / enwik8 text files."""
    return _require(shared_data / "text")


@pytest.fixture(scope="session")
def alice_path(shared_data: Path) -> Path:
    """alice29.txt: 152,089 bytes of ASCII with CRLF line ends."""
    return _require(shared_data / "text" / "alice29.txt")


@pytest.fixture(scope="session")
def fineweb_shard_path(shared_data: Path) -> Path:
    """fineweb_val_000003.bin: the last official sp1024 validation shard (2,021,846 tokens)."""
    return _require(shared_data / "fineweb" / "fineweb_val_000003.bin")


@pytest.fixture(scope="session")
def smoke_shard_path(shared_data: Path) -> Path:
    """smoke_fineweb_val_000000.bin: a small sp1024 shard (131,073 tokens, starts with BOS)."""
    return _require(shared_data / "fineweb" / "smoke_fineweb_val_000000.bin")


@pytest.fixture(scope="session")
def official_tokenizer_path(shared_data: Path) -> Path:
    """The official Parameter Golf sp1024 SentencePiece model (the one shipped in ctxmix/data/assets)."""
    return _require(shared_data / "tokenizers" / "fineweb_1024_bpe.model")


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, bytes | str], Path]:
    """``write_file(name, data)`` writes bytes (or UTF-8 text) to ``tmp_path / name`` and returns the path."""

    def write(name: str, data: bytes | str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        return path

    return write
