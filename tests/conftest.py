from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import App


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A project folder; relative paths in configs resolve against it."""
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)


@pytest.fixture
def app(workdir: Path) -> Iterator[App]:
    application = App(workdir / "app.db")
    try:
        yield application
    finally:
        application.close()
