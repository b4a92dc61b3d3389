"""Integration tests: the host with all four real plugins, through entry points."""

from pathlib import Path

import pytest


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ksi.db"
