"""``NetDeviceAdapter``: the virtio-net device behind the vhost-user server.

A fake front-end (memfd memory, eventfds, a real Unix socket) starts the
rings like QEMU does, and ``virtio.DriverQueue`` plays the driver in the
same memory, so every frame crosses the real server, session and device.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from vhost_user_fakes import (
    F_PROTOCOL_FEATURES,
    GUEST_SIZE,
    GUEST_USER_ADDR,
    QUEUE_SIZE,
    FakeFrontend,
    Harness,
)

from backends.base import SendStatus
from backends.loopback import LoopbackBackend
from device.clock import VirtualClock
from device.eventfd import EventfdInterrupt
from device.features import NetFeature
from device.net_device import RX_QUEUE, TX_QUEUE, VirtioNetDevice
from device.notifier import InterruptNotifier
from device.vhost_user.net_adapter import VHOST_USER_FEATURES, NetDeviceAdapter
from device.vhost_user.protocol import (
    Request,
    decode_u64,
    encode_u64,
)
from virtio import (
    DriverQueue,
    GuestMemory,
    HeadOutOfRange,
    MemoryRegion,
    RingLayout,
    UsageError,
    VirtioFeature,
)

VERSION_1 = int(VirtioFeature.VERSION_1)
MRG_RXBUF = int(NetFeature.MRG_RXBUF)
TX_BUFFERS = 0x10_0000
RX_BUFFERS = 0x18_0000
BUFFER_SIZE = 2048
FRAME = bytes(range(6)) + bytes.fromhex("020000000001") + b"\x08\x00" + bytes(50)


class OffloadLoopback(LoopbackBackend):
    """A loopback that passes offloads on, so the device offers them."""

    takes_offloads = True


class Rig:
    """The device, its adapter, the server harness, a front-end and a driver."""

    def __init__(self, path: Path, backend: LoopbackBackend, tx_mode: str) -> None:
        self.backend = backend
        self.clock = VirtualClock()
        self.device = VirtioNetDevice(
            backend, interrupts=EventfdInterrupt(), clock=self.clock, tx_mode=tx_mode
        )
        self.adapter = NetDeviceAdapter(self.device)
        self.harness = Harness(path, self.adapter)  # type: ignore[arg-type]
        self.connect()

    def connect(self) -> FakeFrontend:
        """Connect a new front-end with its own memory and drivers."""
        self.frontend = self.harness.connect()
        # A mapping of its own, so the front-end can close its mmap at the end
        # while this one is still referenced by the driver's views.
        self._mapping = mmap.mmap(self.frontend.memfd, GUEST_SIZE)
        self.memory = GuestMemory([MemoryRegion(0, self._mapping)])
        self.drivers = {index: self._driver(index) for index in (RX_QUEUE, TX_QUEUE)}
        return self.frontend

    def _driver(self, index: int) -> DriverQueue:
        address = self.frontend.ring_address(index)
        layout = RingLayout(
            QUEUE_SIZE,
            address.desc_user_addr - GUEST_USER_ADDR,
            address.avail_user_addr - GUEST_USER_ADDR,
            address.used_user_addr - GUEST_USER_ADDR,
        )
        kick_fd = self.frontend.kick[index]
        return DriverQueue(
            self.memory,
            layout,
            index=index,
            notify=lambda: os.eventfd_write(kick_fd, 1),
        )

    def start(self, features: int | None = None) -> int:
        """Run QEMU's start-up and return the features acknowledged."""
        frontend = self.frontend
        offered = decode_u64(frontend.call_request(Request.GET_FEATURES))
        if features is None:
            features = offered & (VERSION_1 | MRG_RXBUF)
        acked = features | F_PROTOCOL_FEATURES
        protocol = decode_u64(frontend.call_request(Request.GET_PROTOCOL_FEATURES))
        frontend.send(Request.SET_PROTOCOL_FEATURES, encode_u64(protocol))
        frontend.send(Request.SET_OWNER)
        frontend.send(Request.SET_FEATURES, encode_u64(acked))
        assert frontend.set_mem_table() == 0
        for index in (RX_QUEUE, TX_QUEUE):
            frontend.setup_ring(index)
        for index in (RX_QUEUE, TX_QUEUE):
            frontend.enable_ring(index)
        return features

    def transmit(self, frame: bytes, header: bytes = bytes(12), slot: int = 0) -> None:
        """Put one frame on the TX ring and kick it."""
        address = TX_BUFFERS + slot * BUFFER_SIZE
        self.memory.write(address, header + frame)
        driver = self.drivers[TX_QUEUE]
        driver.add_buf([(address, len(header) + len(frame))], token=slot)
        driver.kick()
        self.harness.pump()

    def post_rx_buffers(self, count: int, size: int = BUFFER_SIZE) -> None:
        driver = self.drivers[RX_QUEUE]
        for slot in range(count):
            driver.add_buf([], [(RX_BUFFERS + slot * BUFFER_SIZE, size)], token=slot)
        driver.kick()
        self.harness.pump()

    def close(self) -> None:
        self.drivers.clear()
        self.memory = None  # type: ignore[assignment]
        self.harness.close()


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator:
    rigs: list[Rig] = []

    def make(backend: LoopbackBackend | None = None, tx_mode: str = "immediate") -> Rig:
        rig = Rig(
            tmp_path / f"net{len(rigs)}.sock", backend or LoopbackBackend(), tx_mode
        )
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


# -- features --------------------------------------------------------------------


def test_offer_has_no_control_queue_or_config(make_rig) -> None:
    rig = make_rig()
    offered = rig.adapter.features()
    for feature in (
        NetFeature.CTRL_VQ,
        NetFeature.CTRL_RX,
        NetFeature.MAC,
        NetFeature.STATUS,
        NetFeature.MTU,
        VirtioFeature.IN_ORDER,
        VirtioFeature.RING_PACKED,
        VirtioFeature.ACCESS_PLATFORM,
    ):
        assert not offered & feature, feature
    assert offered & VERSION_1
    assert offered & MRG_RXBUF
    assert offered & ~VHOST_USER_FEATURES == 0


def test_adapter_needs_eventfd_interrupts() -> None:
    device = VirtioNetDevice(LoopbackBackend(), interrupts=InterruptNotifier())
    with pytest.raises(ValueError, match="EventfdInterrupt"):
        NetDeviceAdapter(device)


def test_set_features_sets_driver_ok(make_rig) -> None:
    rig = make_rig()
    rig.start()
    assert rig.device.running
    assert rig.device.negotiated == VERSION_1 | MRG_RXBUF
    assert sorted(rig.device.queues) == [RX_QUEUE, TX_QUEUE]


def test_refused_feature_set_closes_connection(make_rig) -> None:
    rig = make_rig(OffloadLoopback())
    # GUEST_TSO4 without GUEST_CSUM breaks a dependency (5.1.3.1).
    features = VERSION_1 | int(NetFeature.GUEST_TSO4) | F_PROTOCOL_FEATURES
    assert rig.adapter.features() & NetFeature.GUEST_TSO4
    rig.frontend.send(Request.SET_FEATURES, encode_u64(features))
    assert rig.frontend.is_closed()
    assert rig.harness.server.counters["protocol_errors"] == 1


def test_new_features_restart_running_rings(make_rig) -> None:
    rig = make_rig()
    rig.start()
    rig.transmit(FRAME)
    rig.frontend.send(Request.SET_FEATURES, encode_u64(VERSION_1 | F_PROTOCOL_FEATURES))
    assert rig.device.negotiated == VERSION_1
    assert sorted(rig.device.queues) == [RX_QUEUE, TX_QUEUE]
    assert rig.device.queues[TX_QUEUE].last_avail_idx == 1
    rig.transmit(FRAME, slot=1)
    assert rig.backend.sent_frames() == [FRAME, FRAME]


def test_start_without_set_features_is_legacy(make_rig) -> None:
    rig = make_rig()
    frontend = rig.frontend
    assert frontend.set_mem_table() == 0
    for index in (RX_QUEUE, TX_QUEUE):
        frontend.setup_ring(index)
    assert rig.device.running
    assert rig.device.header_len == 10
    rig.transmit(FRAME, header=bytes(10))
    assert rig.backend.sent_frames() == [FRAME]


# -- data path -------------------------------------------------------------------


def test_transmit_reaches_backend(make_rig) -> None:
    rig = make_rig()
    rig.start()
    rig.transmit(FRAME)
    assert rig.backend.sent_frames() == [FRAME]
    assert rig.drivers[TX_QUEUE].get_buf() == (0, 0)
    assert rig.device.stats.queue(TX_QUEUE).frames == 1


def test_transmit_header_in_own_descriptor(make_rig) -> None:
    rig = make_rig()
    rig.start()
    rig.memory.write(TX_BUFFERS, bytes(12))
    rig.memory.write(TX_BUFFERS + 64, FRAME)
    driver = rig.drivers[TX_QUEUE]
    driver.add_buf([(TX_BUFFERS, 12), (TX_BUFFERS + 64, len(FRAME))], token="two")
    driver.kick()
    rig.harness.pump()
    assert rig.backend.sent_frames() == [FRAME]


@pytest.mark.parametrize("features", [VERSION_1 | MRG_RXBUF, VERSION_1])
def test_receive_fills_one_buffer(make_rig, features: int) -> None:
    rig = make_rig()
    rig.start(features)
    rig.post_rx_buffers(4)
    rig.device.receive(bytes(12), FRAME)
    token, length = rig.drivers[RX_QUEUE].get_buf()
    assert token == 0
    assert length == 12 + len(FRAME)
    written = rig.memory.read(RX_BUFFERS, length)
    # num_buffers is 1 with and without MRG_RXBUF once VERSION_1 is set.
    assert written[:12] == bytes(10) + b"\x01\x00"
    assert written[12:] == FRAME


def test_mergeable_frame_spans_buffers(make_rig) -> None:
    rig = make_rig()
    rig.start(VERSION_1 | MRG_RXBUF)
    rig.post_rx_buffers(4, size=64)
    frame = bytes(range(100))
    rig.device.receive(bytes(12), frame)
    driver = rig.drivers[RX_QUEUE]
    lengths = [driver.get_buf()[1], driver.get_buf()[1]]
    assert lengths == [64, 48]
    data = rig.memory.read(RX_BUFFERS, 64) + rig.memory.read(
        RX_BUFFERS + BUFFER_SIZE, 48
    )
    assert data[10:12] == b"\x02\x00"
    assert data[12:] == frame


def test_without_mergeable_small_buffer_is_kept(make_rig) -> None:
    rig = make_rig()
    rig.start(VERSION_1)
    rig.post_rx_buffers(2, size=64)
    rig.device.receive(bytes(12), bytes(100))
    assert rig.device.stats.queue(RX_QUEUE).drops["rx-never-fits"] == 1
    assert rig.drivers[RX_QUEUE].get_buf() is None
    rig.device.receive(bytes(12), FRAME[:40])
    assert rig.drivers[RX_QUEUE].get_buf() == (0, 12 + 40)


def test_loopback_frame_returns_unchanged(make_rig) -> None:
    rig = make_rig(LoopbackBackend(echo=True))
    rig.start()
    rig.post_rx_buffers(8)
    frames = [FRAME, bytes(range(200)), bytes(range(60)) * 20]
    for slot, frame in enumerate(frames):
        rig.transmit(frame, slot=slot)
    while (received := rig.backend.receive()) is not None:
        rig.device.receive(*received)
    driver = rig.drivers[RX_QUEUE]
    for frame in frames:
        token, length = driver.get_buf()
        data = rig.memory.read(RX_BUFFERS + token * BUFFER_SIZE, length)
        assert data[12:] == frame


def test_interrupt_written_to_call_fd(make_rig) -> None:
    rig = make_rig()
    rig.start()
    rig.transmit(FRAME)
    assert os.eventfd_read(rig.frontend.call[TX_QUEUE]) == 1
    assert rig.device.interrupts.interrupts[TX_QUEUE] == 1


# -- stopping and restarting ------------------------------------------------------


def test_stop_gives_back_busy_chain(make_rig) -> None:
    backend = LoopbackBackend()
    rig = make_rig(backend)
    rig.start()
    backend.fail_sends(2, SendStatus.BUSY)
    rig.transmit(FRAME)
    assert rig.device.tx.pending is not None
    # The second BUSY makes stop_queue give the chain back unsent.
    assert rig.frontend.get_vring_base(TX_QUEUE) == 0
    assert backend.sent_frames() == []
    rig.frontend.restart_ring(TX_QUEUE, 0)
    assert backend.sent_frames() == [FRAME]
    assert rig.drivers[TX_QUEUE].get_buf() == (0, 0)


def test_stop_sends_busy_chain_when_backend_ready(make_rig) -> None:
    backend = LoopbackBackend()
    rig = make_rig(backend)
    rig.start()
    backend.fail_sends(1, SendStatus.BUSY)
    rig.transmit(FRAME)
    assert rig.frontend.get_vring_base(TX_QUEUE) == 1
    assert backend.sent_frames() == [FRAME]
    assert rig.drivers[TX_QUEUE].get_buf() == (0, 0)


def test_restart_continues_used_index(make_rig) -> None:
    rig = make_rig()
    rig.start()
    driver = rig.drivers[TX_QUEUE]
    for slot in range(3):
        rig.transmit(FRAME, slot=slot)
    assert [driver.get_buf() for _ in range(3)] == [(0, 0), (1, 0), (2, 0)]
    assert rig.frontend.get_vring_base(TX_QUEUE) == 3
    rig.frontend.restart_ring(TX_QUEUE, 3)
    rig.transmit(FRAME, slot=3)
    assert driver.get_buf() == (3, 0)
    assert len(rig.backend.sent_frames()) == 4


def test_restart_sends_chains_added_while_stopped(make_rig) -> None:
    rig = make_rig()
    rig.start()
    assert rig.frontend.get_vring_base(TX_QUEUE) == 0
    rig.memory.write(TX_BUFFERS, bytes(12) + FRAME)
    rig.drivers[TX_QUEUE].add_buf([(TX_BUFFERS, 12 + len(FRAME))], token=0)
    rig.frontend.restart_ring(TX_QUEUE, 0)
    assert rig.backend.sent_frames() == [FRAME]


def test_restart_clears_no_notify(make_rig) -> None:
    rig = make_rig(tx_mode="bh")
    rig.start()
    rig.transmit(FRAME)
    # The bottom half is scheduled and notifications are off.
    assert rig.drivers[TX_QUEUE].kick_prepare() is False
    assert rig.frontend.get_vring_base(TX_QUEUE) == 0
    rig.frontend.restart_ring(TX_QUEUE, 0)
    rig.clock.advance(1_000_000)
    assert rig.backend.sent_frames() == [FRAME]
    assert rig.drivers[TX_QUEUE].kick_prepare() is True


def test_stop_drops_held_frames(make_rig) -> None:
    rig = make_rig()
    rig.start()
    rig.device.receive(bytes(12), FRAME)
    assert rig.device.stats.queue(RX_QUEUE).held == 1
    rig.frontend.get_vring_base(RX_QUEUE)
    assert rig.device.stats.queue(RX_QUEUE).drops["queue-stopped"] == 1


def test_stop_of_stopped_queue_raises(make_rig) -> None:
    rig = make_rig()
    with pytest.raises(UsageError, match="queue 1 is not running"):
        rig.adapter.stop_queue(TX_QUEUE)


def test_disconnect_resets_device(make_rig) -> None:
    rig = make_rig()
    rig.start()
    rig.transmit(FRAME)
    rig.harness.server.disconnect()
    assert not rig.device.running
    assert rig.device.queues == {}
    assert rig.device.memory is None
    assert rig.adapter.interrupts.call_fds == {}


# -- driver errors ---------------------------------------------------------------


def test_broken_ring_stops_kick_watch(make_rig) -> None:
    rig = make_rig()
    rig.start()
    driver = rig.drivers[TX_QUEUE]
    # An avail ring entry naming a head past the table breaks the device.
    avail = rig.memory.u16_array(driver.layout.avail, 3 + QUEUE_SIZE)
    avail[2] = QUEUE_SIZE + 5
    avail[1] = 1
    os.eventfd_write(rig.frontend.kick[TX_QUEUE], 1)
    rig.harness.pump()
    assert rig.device.broken
    assert rig.harness.server.counters["broken_queues"] == 1
    assert rig.device.stats.breaks == 1


def test_connection_after_break_works(make_rig) -> None:
    rig = make_rig()
    rig.start()
    rig.device.fail(HeadOutOfRange("injected by the test", queue=TX_QUEUE))
    assert rig.device.broken
    rig.harness.server.disconnect()
    rig.connect()
    rig.start()
    assert rig.device.running
    rig.transmit(FRAME)
    assert rig.backend.sent_frames() == [FRAME]
