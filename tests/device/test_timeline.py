"""Timeline pictures: SVG, PNG, text and side-by-side comparisons."""

from __future__ import annotations

import io
import re
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from device.cli import main
from device.timeline import (
    BREAK_PX,
    KINDS,
    TimeScale,
    build_run,
    layout,
    spread_labels,
    write_svg,
    write_text,
)
from device.trace import Step

SVG = "{http://www.w3.org/2000/svg}"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def svg_texts(path: Path) -> list[str]:
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    return [element.text or "" for element in root.iter(f"{SVG}text")]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def figure_run():
    return build_run("figure")


# -- SVG -----------------------------------------------------------------------------


def test_svg_is_well_formed(tmp_path: Path) -> None:
    path = tmp_path / "figure.svg"
    assert main(["timeline", "--scenario", "figure", "-o", str(path)]) == 0
    texts = svg_texts(path)
    assert any(text.startswith("figure, tx-mode timer") for text in texts)
    assert "guest (driver)" in texts
    assert "host (device)" in texts
    assert "TX ring occupancy" in texts


def test_svg_labels_every_event_kind(tmp_path: Path, figure_run) -> None:
    path = tmp_path / "figure.svg"
    canvas = layout([figure_run])
    with path.open("w", encoding="utf-8") as file:
        write_svg(canvas, file)
    texts = svg_texts(path)
    occurred = {event.kind.key for event in figure_run.events}
    assert occurred == {kind.key for kind in KINDS}
    for kind in KINDS:
        names = tuple(f"{int(step)} {step.label}" for step in kind.steps)
        labels = [text for text in texts if text.startswith(names)]
        assert labels, f"no occurrence of {kind.key} is labelled"
        legend = [text for text in texts if kind.description in text]
        assert legend, f"{kind.key} missing from the legend"


def test_svg_escapes_text(figure_run) -> None:
    canvas = layout([figure_run], title='a <b> & "c"')
    buffer = io.StringIO()
    write_svg(canvas, buffer)
    root = ET.fromstring(buffer.getvalue().encode())
    texts = [element.text for element in root.iter(f"{SVG}text")]
    assert 'a <b> & "c"' in texts


def test_svg_size_bounded_for_long_run() -> None:
    sizes = {}
    for count in (2_000, 8_000):
        run = build_run("saturate", count=count)
        buffer = io.StringIO()
        write_svg(layout([run]), buffer)
        sizes[count] = len(buffer.getvalue())
        root = ET.fromstring(buffer.getvalue().encode())
        texts = [element.text or "" for element in root.iter(f"{SVG}text")]
        labels = [text for text in texts if text.startswith("3 xmit_skb p")]
        assert 1 <= len(labels) <= 6
    # Ticks on the same pixel rows merge, so 4 times the events cost far less
    # than 4 times the size.
    assert sizes[8_000] < 2.5 * sizes[2_000]
    assert sizes[8_000] < 800_000


def test_svg_cuts_idle_gaps(tmp_path: Path) -> None:
    path = tmp_path / "trickle.svg"
    assert main(["timeline", "--scenario", "trickle", "-o", str(path)]) == 0
    gaps = [t for t in svg_texts(path) if t.endswith("without events ...")]
    assert len(gaps) >= 9


# -- PNG -----------------------------------------------------------------------------


def test_png_opens(tmp_path: Path, figure_run) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.image

    path = tmp_path / "figure.png"
    assert main(["timeline", "--scenario", "figure", "-o", str(path)]) == 0
    canvas = layout([figure_run])
    width, height = png_size(path)
    assert (width, height) == (round(canvas.width), round(canvas.height))
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.05  # not a blank picture


def test_png_without_matplotlib(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "figure.png"
    assert main(["timeline", "-o", str(path)]) == 2
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err
    assert not path.exists()


# -- text ----------------------------------------------------------------------------

LINE = re.compile(r"^ *\d+\.\d{3} us  (guest|host) +(\d+) (\w+)")


def test_text_one_line_per_event(
    capsys: pytest.CaptureFixture[str], figure_run
) -> None:
    assert main(["timeline", "--scenario", "figure", "-o", "-"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# figure, tx-mode timer")
    events = lines[1:]
    assert len(events) == len(figure_run.events)
    for line, event in zip(events, figure_run.events):
        match = LINE.match(line)
        assert match, f"unexpected line {line!r}"
        assert match.group(1) == event.kind.side.value
        assert Step(int(match.group(2))).label == match.group(3)


def test_text_times_are_sorted(figure_run) -> None:
    out = io.StringIO()
    write_text([figure_run], out)
    times = [float(line.split()[0]) for line in out.getvalue().splitlines()[1:]]
    assert times == sorted(times)


# -- comparisons ---------------------------------------------------------------------


def test_compare_svg_has_both_runs(tmp_path: Path) -> None:
    path = tmp_path / "compare.svg"
    argv = ["timeline", "--scenario", "saturate", "--compare", "bh,timer"]
    assert main([*argv, "-o", str(path)]) == 0
    texts = svg_texts(path)
    assert any(t.startswith("saturate, tx-mode bh") for t in texts)
    assert any(t.startswith("saturate, tx-mode timer") for t in texts)
    assert any("tx-mode bh vs tx-mode timer" in t for t in texts)
    assert any(t.startswith("101 tx_timer_fire") for t in texts)
    assert any(t.startswith("102 tx_bh_run") for t in texts)


def test_compare_text_has_both_runs(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["timeline", "--scenario", "trickle", "--compare", "bh,timer", "-o", "-"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    headers = [line for line in lines if line.startswith("#")]
    assert len(headers) == 2
    modes = {line.split()[0] for line in lines if not line.startswith("#")}
    assert modes == {"bh", "timer"}


def test_compare_png_is_twice_as_wide(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    single, double = tmp_path / "one.png", tmp_path / "two.png"
    assert main(["timeline", "--scenario", "trickle", "-o", str(single)]) == 0
    argv = ["timeline", "--scenario", "trickle", "--compare", "bh,timer"]
    assert main([*argv, "-o", str(double)]) == 0
    assert png_size(double)[0] == 2 * png_size(single)[0]


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scenario", "nope", "-o", "-"], "unknown scenario 'nope'"),
        (["--scenario", "/nonexistent/x.pcapng", "-o", "-"], "not found"),
        (["--compare", "bh", "-o", "-"], "invalid --compare"),
        (["--compare", "bh,fast", "-o", "-"], "invalid --compare"),
        (["--compare", "bh,timer", "--tx-mode", "bh", "-o", "-"], "not both"),
        (["-o", "/nonexistent/dir/out.svg"], "cannot write /nonexistent/dir"),
    ],
)
def test_command_user_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["timeline", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("virtio-net-emu timeline: ")
    assert message in err


def test_capture_file_timeline(capsys: pytest.CaptureFixture[str]) -> None:
    from device.scenarios import SAMPLE_CAPTURE

    argv = ["timeline", "--scenario", str(SAMPLE_CAPTURE), "--rate", "5000"]
    assert main([*argv, "-o", "-"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# sample.pcap, tx-mode bh")
    assert out.count(" 3 xmit_skb ") == 20


# -- the time axis and labels --------------------------------------------------------


def test_time_scale_cuts_long_gaps() -> None:
    scale = TimeScale([0, 1_000, 2_000, 1_000_000, 1_001_000], px_per_ns=0.01)
    assert len(scale.breaks) == 1
    assert scale.y(2_000) == pytest.approx(20)
    assert scale.y(1_000_000) == pytest.approx(20 + BREAK_PX)
    assert scale.height == pytest.approx(30 + BREAK_PX)
    ys = [scale.y(t) for t in range(0, 1_001_001, 5_000)]
    assert ys == sorted(ys)


def test_spread_labels_keeps_order_and_room() -> None:
    targets = [100.0, 101.0, 102.0, 103.0, 300.0]
    placed = spread_labels(targets, 13.0)
    assert placed == sorted(placed)
    gaps = [b - a for a, b in zip(placed, placed[1:])]
    assert min(gaps) >= 13.0 - 1e-9
    assert placed[0] < 100.0  # the stack centers on its events
    assert placed[-1] == 300.0
