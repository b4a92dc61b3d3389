from __future__ import annotations

import pytest
from limits_helpers import VirtualTime


@pytest.fixture
def vt() -> VirtualTime:
    return VirtualTime()
