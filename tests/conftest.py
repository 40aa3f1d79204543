"""Shared fixtures: the real peers (tests.support.fixtures) and a runner for the fetchd CLI.

fetchd is always run as a separate process, exactly as a user or a script runs it, so
tests see real exit codes, real stderr, and real concurrency between processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cli import Fetchd
from tests.support.stage1 import Stage1

pytest_plugins = [
    "tests.support.fixtures",
    "tests.support.appc",
    "tests.support.pgp",
    "tests.support.ocigpg",
]


@pytest.fixture
def fetchd(tmp_path: Path) -> Fetchd:
    home = tmp_path / "home"
    home.mkdir()
    return Fetchd(tmp_path / "store", home)


@pytest.fixture
def stage1(tmp_path: Path) -> Stage1:
    """stage1 run by root, with a store inside the test's private (0700) temporary dir."""
    return Stage1(tmp_path / "store")
