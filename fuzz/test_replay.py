"""Replay the stored ring cases and fuzz the bytes decoder with hypothesis."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ring_decoder import decode
from run_ring import CaseError, InvariantViolation, load_case, run_case

from virtio import DRIVER_ERROR_KINDS, DeviceQueue

CORPUS = Path(__file__).parent / "corpus" / "ring"
CASES = sorted(CORPUS.glob("*.json"))
IN_CI = bool(os.environ.get("CI"))


def case_param(path: Path):
    case = load_case(path)
    marks = []
    if case.get("known_bug"):
        # strict: the test fails once the bug is fixed, so the mark is removed.
        marks.append(pytest.mark.xfail(strict=True, reason=case["known_bug"]))
    return pytest.param(path, id=path.stem, marks=marks)


def test_corpus_is_present() -> None:
    assert len(CASES) >= 12
    assert all(path.suffix == ".json" for path in CASES)


@pytest.mark.parametrize("path", [case_param(path) for path in CASES])
def test_replay_case(path: Path) -> None:
    case = load_case(path)
    expect = case.get("expect", {})

    result = run_case(case)

    if "broken" in expect:
        assert result.broken == expect["broken"]
    if "errors" in expect:
        assert result.errors == expect["errors"]
    elif expect.get("broken"):
        assert result.errors == [expect["broken"]]  # raised exactly once
    if "popped" in expect:
        assert result.popped == expect["popped"]
    if "used_idx" in expect:
        assert result.used_idx == expect["used_idx"]
    if "last_avail_idx" in expect:
        assert result.last_avail_idx == expect["last_avail_idx"]
    if "notifications" in expect:
        assert result.notifications == expect["notifications"]


def test_corpus_covers_every_error_kind() -> None:
    kinds = set()
    for path in CASES:
        kinds.update(load_case(path).get("expect", {}).get("errors", []))
        broken = load_case(path).get("expect", {}).get("broken")
        if broken:
            kinds.add(broken)

    assert kinds == set(DRIVER_ERROR_KINDS)


# -- the decoder ------------------------------------------------------------------------

FUZZ_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=IN_CI,
    database=None if IN_CI else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ_SETTINGS
@given(st.binary(max_size=600))
def test_decoded_bytes_keep_invariants(data: bytes) -> None:
    run_case(decode(data))


@settings(max_examples=50, deadline=None, derandomize=IN_CI, database=None)
@given(st.binary(max_size=300))
def test_decoder_is_deterministic_and_json_safe(data: bytes) -> None:
    case = decode(data)

    assert decode(data) == case
    assert json.loads(json.dumps(case)) == case


def test_decoder_accepts_empty_input() -> None:
    case = decode(b"")

    assert case["queue"]["size"] == 1
    assert case["ops"] == []
    run_case(case)


# -- the runner can fail ------------------------------------------------------------------


def test_runner_rejects_malformed_case() -> None:
    with pytest.raises(CaseError):
        run_case({"queue": {"size": 3}})
    with pytest.raises(CaseError):
        run_case({"queue": {"size": 4}, "ops": [{"op": "launch"}]})


def test_runner_catches_write_outside_used_ring(monkeypatch) -> None:
    case = load_case(CORPUS / "valid-direct-and-indirect.json")
    original = DeviceQueue.publish

    def publish_and_scribble(self):
        self.memory.write(self.layout.desc, b"\xff")  # the descriptor table
        return original(self)

    monkeypatch.setattr(DeviceQueue, "publish", publish_and_scribble)

    with pytest.raises(InvariantViolation, match="outside the used ring"):
        run_case(case)


def test_runner_catches_escaped_exception(monkeypatch) -> None:
    case = load_case(CORPUS / "valid-direct-and-indirect.json")

    def broken_available(self):
        raise IndexError("index out of range")

    monkeypatch.setattr(DeviceQueue, "available", broken_available)

    with pytest.raises(InvariantViolation, match="IndexError"):
        run_case(case)


def test_runner_catches_wrong_notification(monkeypatch) -> None:
    case = load_case(CORPUS / "valid-direct-and-indirect.json")
    monkeypatch.setattr(DeviceQueue, "needs_notification", lambda self: False)

    with pytest.raises(InvariantViolation, match="notification decision"):
        run_case(case)


# -- atheris ----------------------------------------------------------------------------


def test_atheris_target_runs_inputs() -> None:
    pytest.importorskip("atheris")
    import atheris_ring

    for data in (b"", bytes(range(256)), b"\x07" * 300):
        atheris_ring.test_one_input(data)
