"""Fixtures: a store in a temporary folder, and a running collector bound to 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from payscope.collector.store import Store, open_store
from tests.helpers import CollectorProcess


@pytest.fixture()
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "payscope.db"


@pytest.fixture()
def store(store_path: Path) -> Iterator[Store]:
    opened = open_store(str(store_path))
    yield opened
    opened.close()


@pytest.fixture()
def collector(store_path: Path) -> Iterator[CollectorProcess]:
    proc = CollectorProcess(store_path)
    yield proc
    proc.stop()
