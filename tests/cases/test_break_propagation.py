"""A break, a reset or a flood that happens while another queue is at work.

The device is broken as a whole, not queue by queue: a ring violation seen on
one queue while the TX flush of another is inside a backend call must stop
that flush too. A reset from inside a control command must leave the command's
buffers alone, and a control queue the driver keeps refilling must not hold
the device for ever.
"""

from __future__ import annotations

from test_races import EI, HEADER, V1, Driver, frame, queue, start

from backends.base import SendStatus
from device.net_device import CONTROL_BUDGET
from virtio import DeviceStatus, VirtioFeature

CTRL = "VIRTIO_NET_F_CTRL_VQ"
CTRL_RX = "VIRTIO_NET_F_CTRL_RX"


def _tx_chains(run, count: int) -> Driver:
    tx = Driver(run, 1)
    for k in range(count):
        tx.memory.write(0x10000 + k * 0x1000, HEADER + frame(60, k + 1))
        tx.desc(k, 0x10000 + k * 0x1000, 72)
    return tx


def _break_inside_first_send(run, monkeypatch, breaker) -> dict:
    send = run.backend.send_gather
    seen: dict = {}

    def send_then_break(buffers):
        status = send(buffers)
        if not seen:
            breaker()
            seen["sent"] = run.backend.frames_sent
        return status

    monkeypatch.setattr(run.backend, "send_gather", send_then_break)
    return seen


def test_rx_break_stops_tx_flush(monkeypatch) -> None:
    run = start([V1], {"0": queue(4, 0x4000, 0x5000, 0x6000), "1": queue(4)})
    tx = _tx_chains(run, 3)
    Driver(run, 0).post(7)  # head 7 is out of range on the RX queue
    seen = _break_inside_first_send(
        run, monkeypatch, lambda: run.device.receive(None, frame(60))
    )
    tx.post(0, 1, 2)

    run.device.handle_kick(1)

    assert run.device.status.value & DeviceStatus.DEVICE_NEEDS_RESET
    assert run.backend.frames_sent == seen["sent"] == 1
    # The break came while the first frame was in the backend, before its
    # chain was completed; a broken device writes no used ring afterwards.
    assert tx.used_idx == 0
    assert run.interrupts.config_interrupts == 1
    assert run.interrupts.interrupts.get(1, 0) == 0


def test_control_break_stops_tx_flush(monkeypatch) -> None:
    run = start([V1, CTRL], {"1": queue(4), "2": queue(4, 0x4000, 0x5000, 0x6000)})
    tx = _tx_chains(run, 3)
    control = Driver(run, 2)
    control.desc(0, 0x40000, 2, 1, 9)  # next out of range
    control.post(0)
    seen = _break_inside_first_send(run, monkeypatch, lambda: run.device.handle_kick(2))
    tx.post(0, 1, 2)

    run.device.handle_kick(1)

    assert run.device.error.kind == "next-out-of-range"
    assert run.backend.frames_sent == seen["sent"] == 1


def _control_chains(run) -> Driver:
    control = Driver(run, 2)
    control.memory.write(0x40000, bytes([0, 0, 1]))  # RX class, PROMISC, on
    for k in range(2):
        control.desc(2 * k, 0x40000, 3, 1, 2 * k + 1)
        control.desc(2 * k + 1, 0x41000 + k, 1, 2, 0)
    return control


def test_control_flood_yields_after_budget(monkeypatch) -> None:
    run = start([V1, CTRL, CTRL_RX], {"2": queue(4, 0x4000, 0x5000, 0x6000)})
    control = _control_chains(run)
    handle = run.device.control.handle
    handled = [0]

    def handle_and_refill(request: bytes) -> int:
        handled[0] += 1
        control.post(2 * (handled[0] % 2))
        return handle(request)

    monkeypatch.setattr(run.device.control, "handle", handle_and_refill)
    control.post(0)

    run.device.handle_kick(2)

    assert handled[0] == CONTROL_BUDGET
    run.clock.run_next()
    assert handled[0] == 2 * CONTROL_BUDGET


def test_reset_inside_control_command(monkeypatch) -> None:
    run = start([V1, CTRL, CTRL_RX], {"2": queue(4, 0x4000, 0x5000, 0x6000)})
    control = _control_chains(run)
    control.memory.write(0x41000, b"\xff\xff")
    handle = run.device.control.handle
    snapshot: dict = {}

    def handle_then_reset(request: bytes) -> int:
        ack = handle(request)
        if not snapshot:
            run.device.write_status(0)
            snapshot["ack"] = control.memory.read(0x41000, 2)
            snapshot["used"] = control.used_ring_bytes()
        return ack

    monkeypatch.setattr(run.device.control, "handle", handle_then_reset)
    control.post(0, 2)

    run.device.handle_kick(2)

    assert control.memory.read(0x41000, 2) == snapshot["ack"] == b"\xff\xff"
    assert control.used_ring_bytes() == snapshot["used"]
    assert run.interrupts.interrupts == {}


def test_busy_chain_never_completes_after_reset() -> None:
    run = start([V1, EI], {"1": queue(4)})
    tx = _tx_chains(run, 2)
    run.backend.fail_sends(1, SendStatus.BUSY)
    tx.post(0, 1)
    run.device.handle_kick(1)

    run.device.write_status(0)
    before = tx.used_ring_bytes()
    run.device.backend_writable()
    run.clock.advance(10**9)

    assert tx.used_ring_bytes() == before
    assert run.interrupts.interrupts.get(1, 0) == 0


def test_legacy_driver_keeps_only_valid_features() -> None:
    run = start(
        ["VIRTIO_F_NOTIFY_ON_EMPTY", "VIRTIO_NET_F_HOST_TSO4"],
        {"1": queue(4)},
        status=7,
    )

    negotiated = run.device.negotiated

    assert not negotiated & VirtioFeature.NOTIFY_ON_EMPTY
    assert not negotiated & (1 << 11)  # HOST_TSO4 needs CSUM, not accepted
