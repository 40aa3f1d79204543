"""Session fixtures for the real peers. Register with, in tests/conftest.py:

pytest_plugins = ["tests.support.fixtures"]
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .images import Layer, busybox_rootfs_layer
from .registry import Registry, start_registry
from .tls import TestCA, make_ca


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One plain-HTTP registry for the session: give each test its own repository names."""
    with start_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def tls_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def busybox_layer() -> Layer:
    return busybox_rootfs_layer()
