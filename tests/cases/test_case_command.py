"""``case_command``: the output, the exit codes and the file errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device.case import CaseError, case_command, load_case, run_case

CASES = Path(__file__).parent
PASSING = CASES / "a1c-avail-index-full-ring.json"
BROKEN = CASES / "a1-avail-index-jump.json"


def write_case(tmp_path: Path, body: object) -> str:
    path = tmp_path / "case.json"
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return str(path)


def minimal(**fields: object) -> dict:
    body = {
        "format": "virtio-net-case/1",
        "features": ["VIRTIO_F_VERSION_1"],
        "memory": [{"gpa": 0, "size": 65536}],
    }
    body.update(fields)
    return body


def test_json_output_is_one_object(capsys) -> None:
    code = case_command(str(BROKEN), as_json=True)

    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["status"] == 0x4F
    assert result["error"]["kind"] == "avail-index-jump"
    assert result["error"]["queue"] == 1
    assert result["sent"] == []
    assert result["interrupts"] == {"config": 1}


def test_summary_names_the_error(capsys) -> None:
    code = case_command(str(BROKEN), as_json=False)

    out = capsys.readouterr().out
    assert code == 0
    assert "error: avail-index-jump on queue 1" in out
    assert "DEVICE_NEEDS_RESET" in out


def test_unmet_expectation_exits_1(tmp_path, capsys) -> None:
    body = json.loads(PASSING.read_text())
    body["expect"]["sent_len"] = [61, 60, 60, 60]

    code = case_command(write_case(tmp_path, body), as_json=True)

    err = capsys.readouterr().err
    assert code == 1
    assert "expectation not met: sent lengths" in err


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{", "not valid JSON"),
        ({"format": "virtio-net-case/2"}, "format"),
        (minimal(features=["VIRTIO_F_NOPE"]), "unknown virtio-net feature name"),
        ({"format": "virtio-net-case/1"}, "missing field 'memory'"),
        (
            minimal(queues={"1": {"size": 3, "desc": 0, "avail": 0, "used": 0}}),
            "power of two",
        ),
        (minimal(writes=[{"gpa": 65535, "u16": [1]}]), "not all inside guest memory"),
        (minimal(actions=[{"kick": -1}]), "outside 0..4294967295"),
        (minimal(actions=[{"jump": 1}]), "unknown action"),
        (minimal(actions=[{"kick": 1, "extra": 2}]), "unknown fields"),
        (minimal(expect={"stat": 1}), "expect"),
        (minimal(writes=[{"gpa": 0, "desc": [[0, 1, "X", 0]]}]), "unknown flag letter"),
        (minimal(tx_mode="fast"), "unknown mode"),
    ],
    ids=[
        "bad-json",
        "format",
        "feature",
        "memory",
        "queue-size",
        "write-outside",
        "negative-kick",
        "action",
        "action-field",
        "expect-key",
        "flag-letter",
        "tx-mode",
    ],
)
def test_invalid_file_exits_2(tmp_path, capsys, body, message) -> None:
    code = case_command(write_case(tmp_path, body), as_json=False)

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert message in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_missing_file_exits_2(tmp_path, capsys) -> None:
    code = case_command(str(tmp_path / "absent.json"), as_json=True)

    assert code == 2
    assert "cannot read" in capsys.readouterr().err


def test_hex_numbers_and_repeat() -> None:
    case = load_case(minimal(actions=[{"kick": "0x1", "repeat": 3}]))

    assert case.actions == [("kick", 1)] * 3


def test_event_idx_spellings_agree() -> None:
    linux = load_case(minimal(features=["VIRTIO_RING_F_EVENT_IDX"]))
    spec = load_case(minimal(features=["VIRTIO_F_EVENT_IDX"]))

    assert linux.features == spec.features


def test_reset_then_status_restarts_queues() -> None:
    body = json.loads(PASSING.read_text())
    body["actions"] = [{"kick": 1}, {"reset": True}, {"status": 15}, {"kick": 1}]

    result = run_case(body)

    assert result["status"] == 15
    assert len(result["sent"]) == 8
    assert result["used"]["1"]["ring"] == [[k % 4, 0] for k in range(8)]


def test_refused_features_stop_bring_up() -> None:
    result = run_case(minimal(features=["VIRTIO_F_VERSION_1", "VIRTIO_NET_F_MQ"]))

    assert result["status"] == 3
    assert result["rejected_status"] == []


def test_rejected_status_write_is_reported() -> None:
    result = run_case(minimal(actions=[{"status": 64 | 15}]))

    assert result["rejected_status"][0]["value"] == 79
    assert result["status"] == 15


def test_case_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        load_case({"format": "virtio-net-case/1"})
    assert issubclass(CaseError, ValueError)
