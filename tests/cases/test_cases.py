"""Replay every case file in this folder and check its outcome and invariants.

Each ``*.json`` here is one case of bad driver input in the replayable
format of ``device.case``. The test runs it and compares the result with the
file's ``expect`` section. After every step it also checks the invariants of
``device.case_check``. Nothing is written outside the used rings and the
writable buffers in flight, so descriptor tables, avail rings and
device-readable buffers stay byte-identical. No head is used twice, used.idx
moves by exactly the elements written, used.flags is 0 or 1, and there is no
work or interrupt while the device is not running.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device.case import CaseRun, load_case
from device.case_check import InvariantChecker

CASES = sorted(Path(__file__).parent.glob("*.json"))


def test_cases_folder_is_not_empty() -> None:
    assert len(CASES) > 50


@pytest.mark.parametrize("path", CASES, ids=[path.stem for path in CASES])
def test_case_replays_as_expected(path: Path) -> None:
    case = load_case(path)
    assert case.expect, f"{path.name} has no expect section"
    checker = InvariantChecker()
    run = CaseRun(case, checker)

    result = run.run()

    assert run.check(result) == []
    assert checker.violations == []


@pytest.mark.parametrize("path", CASES, ids=[path.stem for path in CASES])
def test_case_file_is_canonical_json(path: Path) -> None:
    data = json.loads(path.read_text())

    assert data["format"] == "virtio-net-case/1"
    assert data["description"]
