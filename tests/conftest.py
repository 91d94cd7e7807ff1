"""Fixtures: a store in a temporary folder, and a running collector bound to 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from payscope.collector.store import Store, open_store
from tests.helpers import CapturingHandler, CollectorProcess, serving


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Which tests share a process when the suite runs on several (``dev.py test`` runs it with pytest-xdist's
    ``--dist loadgroup``): those on the session's Elasticsearch node, those on the session's demo store, and
    otherwise each file's, so that no node, demo or module fixture is made twice."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        names = getattr(item, "fixturenames", ())
        if item.nodeid.startswith("tests/test_elasticsearch.py") or "elasticsearch_node" in names \
                or params.get("backend") == "elasticsearch":
            group = "elasticsearch"
        elif "demo_store" in names:
            group = "demo"
        else:
            group = item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture()
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "payscope.db"


@pytest.fixture()
def store(store_path: Path) -> Iterator[Store]:
    opened = open_store(str(store_path))
    yield opened
    opened.close()


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store filled by the demo's real services (run once for the whole session)."""
    from tests.helpers import payscope

    store = tmp_path_factory.mktemp("demo") / "demo.db"
    proc = payscope("demo", "--duration", "25", "--store", str(store), timeout=300)
    assert proc.returncode == 0, proc.stderr
    (store.parent / "demo.stderr").write_text(proc.stderr)
    (store.parent / "demo.stdout").write_text(proc.stdout)
    return store


@pytest.fixture()
def collector(store_path: Path) -> Iterator[CollectorProcess]:
    proc = CollectorProcess(store_path)
    yield proc
    proc.stop()


@pytest.fixture()
def capture() -> Iterator[str]:
    """The URL of a plain HTTP server standing in for the collector; what it was sent is in
    ``CapturingHandler.bodies``."""
    CapturingHandler.bodies = []
    with serving(CapturingHandler) as url:
        yield url


@pytest.fixture(scope="session")
def elasticsearch_node() -> Iterator[object]:
    """One real Elasticsearch node for the session (tests/elastic.py); a provisioning failure fails loudly."""
    from tests import elastic

    with elastic.running(name="payscope-session") as node:
        yield node


@pytest.fixture()
def es_url(elasticsearch_node: object) -> Iterator[str]:
    """The node's URL as a payscope store, emptied of payscope's data before the test."""
    from tests import elastic

    assert isinstance(elasticsearch_node, elastic.Node)
    elastic.wipe(elasticsearch_node)
    yield elasticsearch_node.url.replace("http://", "es://")
