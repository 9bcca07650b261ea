"""Fixtures of the vhost-user tests; the fakes are in ``vhost_user_fakes``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vhost_user_fakes import FakeDevice, Harness


@pytest.fixture
def device() -> FakeDevice:
    return FakeDevice()


@pytest.fixture
def harness(tmp_path: Path, device: FakeDevice) -> Iterator[Harness]:
    harness = Harness(tmp_path / "vhost-user.sock", device)
    try:
        yield harness
    finally:
        harness.close()
