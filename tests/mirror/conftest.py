from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import World
from tests.services.mirror import Mirror


@pytest.fixture
def mirror(world: World, tmp_path: Path) -> Iterator[Mirror]:
    m = Mirror(tmp_path / "mirror", world.upstream.url)
    yield m
    m.stop()
