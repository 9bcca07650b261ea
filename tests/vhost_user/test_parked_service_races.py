"""A parked TX queue in a real ``NetService``, driven over its Unix socket.

The service runs its own ``EventLoop`` on a ``MonotonicClock`` in a thread,
with the default ring polling of 2 ms. A fake front-end sets the rings up in
memfd memory, and ``virtio.DriverQueue`` adds TX chains there from the test's
thread, kicking only when ``kick_prepare`` returns True. Every frame must
reach the backend once, in ring order, whether the device saw a kick for it
or found it by looking at a parked ring.
"""

from __future__ import annotations

import mmap
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from vhost_user_fakes import (
    F_PROTOCOL_FEATURES,
    GUEST_SIZE,
    GUEST_USER_ADDR,
    QUEUE_SIZE,
    FakeFrontend,
)

from backends.base import Buffer, SendStatus
from backends.loopback import LoopbackBackend
from device.net_device import RX_QUEUE, TX_QUEUE
from device.tx_policy import TxPolicy
from device.vhost_user.protocol import (
    Request,
    VhostMemoryRegion,
    decode_u64,
    encode_memory_table,
    encode_u64,
)
from device.vhost_user.service import NetService
from virtio import (
    DriverQueue,
    GuestMemory,
    MemoryRegion,
    RingLayout,
    VirtioFeature,
)

VERSION_1 = int(VirtioFeature.VERSION_1)
EVENT_IDX = int(VirtioFeature.EVENT_IDX)
TX_BUFFERS = 0x10_0000
BUFFER_SIZE = 2048
HEADER = bytes(12)
#: Seconds a frame may take from the ring to the backend. The parked queue
#: looks at least every 100 us (bh) or 150 us (timer) and turns
#: notifications on after 2 ms, so this leaves room for a loaded machine.
LATENCY_BOUND = 0.5
WAIT = 5.0
#: Offset in the memfd where the second region of a two-region table starts,
#: and its guest-physical address.
SECOND_REGION_OFFSET = 0x18_0000
SECOND_REGION_GPA = 0x4000_0000
DESC = struct.Struct("<QIHH")


def frame_bytes(number: int) -> bytes:
    """Return a 60-byte frame that carries ``number`` in its last two bytes."""
    return (
        bytes.fromhex("ffffffffffff020000000002 88b5")
        + bytes(44)
        + struct.pack(">H", number)
    )


def frame_number(frame: bytes) -> int:
    return struct.unpack(">H", frame[-2:])[0]


class TimedBackend(LoopbackBackend):
    """A loopback with ``send_burst`` that stores when each frame arrived."""

    def __init__(self) -> None:
        super().__init__(capacity=1 << 16)
        self.arrivals: list[tuple[float, bytes]] = []

    def send(self, header: Buffer, frame: Sequence[Buffer]) -> SendStatus:
        status = super().send(header, frame)
        if status is SendStatus.SENT:
            self.arrivals.append((time.monotonic(), b"".join(frame)))
        return status

    def send_burst(self, frames: Sequence[Buffer]) -> tuple[int, SendStatus]:
        size = self.header_size
        for sent, data in enumerate(frames):
            status = self.send(bytes(data[:size]), [bytes(data[size:])])
            if status is not SendStatus.SENT:
                return sent, status
        return len(frames), SendStatus.SENT

    def numbers(self) -> list[int]:
        return [frame_number(frame) for _, frame in list(self.arrivals)]


class RawTx:
    """The driver side of the TX ring written by hand, for invalid chains.

    Each frame goes in one descriptor, with its buffer in the ``TX_BUFFERS``
    area. A test uses either this or the ``DriverQueue``, never both.
    """

    def __init__(self, memory: GuestMemory, layout: RingLayout) -> None:
        self.memory = memory
        self.layout = layout
        self.avail_idx = 0

    def put(self, head: int, address: int, length: int) -> None:
        """Write descriptor ``head`` and put it in the next avail slot."""
        self.memory.write(
            self.layout.desc + 16 * (head % QUEUE_SIZE),
            DESC.pack(address, length, 0, 0),
        )
        self.put_head(head)

    def put_head(self, head: int) -> None:
        slot = self.avail_idx % QUEUE_SIZE
        self.memory.write(self.layout.avail_ring_addr(slot), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def frame(self, number: int, head: int | None = None) -> None:
        """Write frame ``number`` into its buffer and post it at ``head``."""
        head = self.avail_idx % QUEUE_SIZE if head is None else head
        address = TX_BUFFERS + (number % QUEUE_SIZE) * BUFFER_SIZE
        data = HEADER + frame_bytes(number)
        self.memory.write(address, data)
        self.put(head, address, len(data))

    def publish(self, avail_idx: int | None = None) -> None:
        if avail_idx is not None:
            self.avail_idx = avail_idx & 0xFFFF
        self.memory.write(self.layout.avail_idx_addr, struct.pack("<H", self.avail_idx))


def wait_until(condition, timeout: float = WAIT) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.001)
    return False


class ServiceRig:
    """A ``NetService`` serving in a thread, a front-end and a TX driver."""

    def __init__(
        self,
        path: Path,
        backend: LoopbackBackend,
        tx_mode: str,
        event_idx: bool,
        start_index: int = 0,
    ) -> None:
        self.path = path
        self.start_index = start_index
        self.backend = backend
        self.event_idx = event_idx
        self.service = NetService(path, backend, tx_mode=tx_mode)
        self.thread = threading.Thread(target=self.service.run, daemon=True)
        self.thread.start()
        self.frontends: list[FakeFrontend] = []
        self.kicks = 0
        self.added_at: dict[int, float] = {}
        self.connect()

    def connect(self, two_regions: bool = False) -> None:
        """Connect a new front-end with fresh memory and start both rings.

        With ``two_regions`` the memory table maps the memfd as two regions:
        guest addresses below ``SECOND_REGION_OFFSET`` at 0, and the rest at
        ``SECOND_REGION_GPA``.
        """
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(str(self.path))
        self.frontend = FakeFrontend(connection)
        self.frontends.append(self.frontend)
        self._mapping = mmap.mmap(self.frontend.memfd, GUEST_SIZE)
        self.memory = GuestMemory([MemoryRegion(0, self._mapping)])
        self.tx = self._driver(TX_QUEUE)
        self.raw = RawTx(self.memory, self.tx.layout)
        self.raw.avail_idx = self.start_index
        frontend = self.frontend
        offered = decode_u64(frontend.call_request(Request.GET_FEATURES))
        features = offered & (VERSION_1 | (EVENT_IDX if self.event_idx else 0))
        frontend.send(Request.SET_OWNER)
        frontend.send(Request.SET_FEATURES, encode_u64(features | F_PROTOCOL_FEATURES))
        if two_regions:
            regions = [
                VhostMemoryRegion(0, SECOND_REGION_OFFSET, GUEST_USER_ADDR, 0),
                VhostMemoryRegion(
                    SECOND_REGION_GPA,
                    GUEST_SIZE - SECOND_REGION_OFFSET,
                    GUEST_USER_ADDR + SECOND_REGION_OFFSET,
                    SECOND_REGION_OFFSET,
                ),
            ]
            payload = encode_memory_table(regions)
            fds = [frontend.memfd, frontend.memfd]
            assert frontend.ack_request(Request.SET_MEM_TABLE, payload, fds) == 0
        else:
            assert frontend.set_mem_table() == 0
        for index in (RX_QUEUE, TX_QUEUE):
            frontend.setup_ring(index, self.start_index)
        for index in (RX_QUEUE, TX_QUEUE):
            frontend.enable_ring(index)
        assert wait_until(lambda: TX_QUEUE in self.service.device.queues)

    def _driver(self, index: int) -> DriverQueue:
        address = self.frontend.ring_address(index)
        layout = RingLayout(
            QUEUE_SIZE,
            address.desc_user_addr - GUEST_USER_ADDR,
            address.avail_user_addr - GUEST_USER_ADDR,
            address.used_user_addr - GUEST_USER_ADDR,
        )
        kick_fd = self.frontend.kick[index]

        def notify() -> None:
            self.kicks += 1
            os.eventfd_write(kick_fd, 1)

        return DriverQueue(
            self.memory,
            layout,
            index=index,
            event_idx=self.event_idx,
            notify=notify,
            start_index=self.start_index,
        )

    def add(self, number: int, kick: bool = True) -> None:
        """Add frame ``number``, and kick if ``kick`` and ``kick_prepare`` agree."""
        while self.tx.get_buf() is not None:
            pass
        slot = number % QUEUE_SIZE
        address = TX_BUFFERS + slot * BUFFER_SIZE
        data = HEADER + frame_bytes(number)
        self.memory.write(address, data)
        self.added_at[number] = time.monotonic()
        self.tx.add_buf([(address, len(data))], token=number)
        if kick:
            self.tx.kick()

    def armed_policy_timers(self) -> list[TxPolicy]:
        """Return the TX policies that own an armed timer of the service's clock."""
        owners = []
        for timer in self.service.clock.armed_timers():
            owner = getattr(timer.callback, "__self__", None)
            if isinstance(owner, TxPolicy):
                owners.append(owner)
        return owners

    def close(self) -> None:
        self.service.stop()
        self.thread.join(10)
        self.service.close()
        self.tx = None  # type: ignore[assignment]
        self.memory = None  # type: ignore[assignment]
        for frontend in self.frontends:
            frontend.close()


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator:
    rigs: list[ServiceRig] = []

    def make(
        tx_mode: str = "bh",
        event_idx: bool = False,
        backend: LoopbackBackend | None = None,
        start_index: int = 0,
    ) -> ServiceRig:
        rig = ServiceRig(
            tmp_path / f"net{len(rigs)}.sock",
            backend or TimedBackend(),
            tx_mode,
            event_idx,
            start_index,
        )
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def assert_each_once_in_time(rig: ServiceRig, count: int, first: int = 0) -> None:
    """Check frames ``first`` to ``first + count - 1`` arrived once, in order, soon."""
    expected = list(range(first, first + count))
    backend = rig.backend
    assert wait_until(lambda: len(backend.arrivals) >= first + count), (
        f"{len(backend.arrivals)} of {first + count} frames arrived,"
        f" parked={rig.service.device.tx_policy and rig.service.device.tx_policy.parked}"
    )
    time.sleep(0.01)
    assert backend.numbers()[first:] == expected
    for arrived, frame in backend.arrivals[first:]:
        number = frame_number(frame)
        assert arrived - rig.added_at[number] < LATENCY_BOUND, number


# -- random gaps around the 2 ms park ----------------------------------------------


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("mode", ["bh", "timer", "immediate"])
def test_random_gaps_each_frame_once(make_rig, mode: str, event_idx: bool) -> None:
    rig = make_rig(mode, event_idx, start_index=0xFFE0)
    generator = random.Random(f"{mode}{event_idx}")
    count = 60
    for number in range(count):
        time.sleep(generator.choice([0, 0, 0.0005, 0.0015, 0.002, 0.0025, 0.005]))
        rig.add(number)
    assert_each_once_in_time(rig, count)
    device = rig.service.device
    assert not device.broken
    assert rig.service.stats()["sent"] == count


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("mode", ["bh", "timer", "immediate"])
def test_vring_base_while_parked_then_restart(
    make_rig, mode: str, event_idx: bool
) -> None:
    rig = make_rig(mode, event_idx, start_index=0xFFFD)
    for number in range(5):
        rig.add(number)
    assert wait_until(lambda: len(rig.backend.arrivals) == 5)
    assert wait_until(lambda: rig.service.device.tx_policy.parked)
    # Added while parked, with no kick: the device may or may not see them
    # before the ring stops.
    for number in range(5, 9):
        rig.add(number, kick=False)
    base = rig.frontend.get_vring_base(TX_QUEUE)
    sent = len(rig.backend.arrivals)
    assert base == (0xFFFD + sent) & 0xFFFF
    assert rig.armed_policy_timers() == []
    for number in range(9, 12):
        rig.add(number, kick=False)
    time.sleep(0.005)
    assert len(rig.backend.arrivals) == sent
    rig.frontend.restart_ring(TX_QUEUE, base)
    assert_each_once_in_time(rig, 12)
    policies = rig.armed_policy_timers()
    assert all(policy is rig.service.device.tx_policy for policy in policies)


@pytest.mark.parametrize("mode", ["bh", "timer", "immediate"])
def test_disconnect_while_parked_then_reconnect(make_rig, mode: str) -> None:
    rig = make_rig(mode)
    for number in range(4):
        rig.add(number)
    assert wait_until(lambda: len(rig.backend.arrivals) == 4)
    assert wait_until(lambda: rig.service.device.tx_policy.parked)
    old_policy = rig.service.device.tx_policy
    rig.frontend.sock.close()
    assert wait_until(lambda: not rig.service.device.queues)
    assert old_policy not in rig.armed_policy_timers()
    rig.connect()
    for number in range(4, 10):
        rig.add(number)
    assert_each_once_in_time(rig, 6, first=4)
    assert old_policy not in rig.armed_policy_timers()


@pytest.mark.parametrize("mode", ["bh", "timer"])
def test_set_features_again_while_parked(make_rig, mode: str) -> None:
    # QEMU sends SET_FEATURES again on each start; other bits reset the device
    # and restart the running rings from where they stopped.
    rig = make_rig(mode)
    for number in range(3):
        rig.add(number)
    assert wait_until(lambda: len(rig.backend.arrivals) == 3)
    assert wait_until(lambda: rig.service.device.tx_policy.parked)
    old_policy = rig.service.device.tx_policy
    for number in range(3, 6):
        rig.add(number, kick=False)
    features = VERSION_1 | int(VirtioFeature.INDIRECT_DESC) | F_PROTOCOL_FEATURES
    assert rig.frontend.ack_request(Request.SET_FEATURES, encode_u64(features)) == 0
    for number in range(6, 9):
        rig.add(number)
    assert_each_once_in_time(rig, 9)
    assert old_policy not in rig.armed_policy_timers()


# -- invalid chains in a run of one-descriptor chains ------------------------------


def fault_head_out_of_range(raw: RawTx) -> None:
    raw.put_head(QUEUE_SIZE + 3)


def fault_head_repeated(raw: RawTx) -> None:
    # The head of the chain just before, still in flight in the same run.
    raw.put_head((raw.avail_idx - 1) % QUEUE_SIZE)


def fault_outside_memory(raw: RawTx) -> None:
    raw.put(raw.avail_idx % QUEUE_SIZE, GUEST_SIZE + 0x1000, 74)


FAULTS = {
    "head-out-of-range": fault_head_out_of_range,
    "outside-memory": fault_outside_memory,
}


def park_after_good_frames(rig: ServiceRig, count: int) -> None:
    for number in range(count):
        rig.raw.frame(number)
    rig.raw.publish()
    os.eventfd_write(rig.frontend.kick[TX_QUEUE], 1)
    assert wait_until(lambda: len(rig.backend.arrivals) == count)
    assert wait_until(lambda: rig.service.device.tx_policy.parked)


def assert_next_connection_serves(rig: ServiceRig) -> None:
    rig.frontend.sock.close()
    assert wait_until(lambda: not rig.service.device.queues)
    sent = len(rig.backend.arrivals)
    rig.connect()
    for number in range(100, 104):
        rig.add(number)
    assert wait_until(lambda: len(rig.backend.arrivals) == sent + 4)
    assert rig.backend.numbers()[sent:] == [100, 101, 102, 103]


@pytest.mark.parametrize("kick", [False, True], ids=["parked", "kicked"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("mode", ["bh", "immediate"])
def test_bad_chain_in_run_breaks_cleanly(
    make_rig, mode: str, fault: str, kick: bool
) -> None:
    rig = make_rig(mode)
    park_after_good_frames(rig, 2)
    for number in range(2, 5):
        rig.raw.frame(number)
    FAULTS[fault](rig.raw)
    rig.raw.frame(5)
    rig.raw.publish()
    if kick:
        os.eventfd_write(rig.frontend.kick[TX_QUEUE], 1)
    device = rig.service.device
    assert wait_until(lambda: device.broken)
    time.sleep(0.01)
    assert rig.backend.numbers() == [0, 1, 2, 3, 4]
    assert device.status.needs_reset
    assert rig.armed_policy_timers() == []
    stats = rig.service.stats()
    assert stats["device_breaks"] == 1
    assert_next_connection_serves(rig)


@pytest.mark.parametrize("kick", [False, True], ids=["parked", "kicked"])
def test_head_repeated_in_run_taken_as_reposted(make_rig, kick: bool) -> None:
    # The burst pops heads 2, 3 and 4, stops at the second 4 (still in
    # flight), and completes the run before it reads on. The per-chain path
    # also completes 4 before it reads the next slot, so both take the repeat
    # as a chain the driver posted again, and each avail entry is consumed once.
    # Making head 4 available while the device still owns it is a driver
    # error, which the device is not required to detect.
    rig = make_rig("bh")
    park_after_good_frames(rig, 2)
    for number in range(2, 5):
        rig.raw.frame(number)
    fault_head_repeated(rig.raw)
    rig.raw.frame(5)
    rig.raw.publish()
    if kick:
        os.eventfd_write(rig.frontend.kick[TX_QUEUE], 1)
    assert wait_until(lambda: len(rig.backend.arrivals) == 7)
    time.sleep(0.01)
    assert rig.backend.numbers() == [0, 1, 2, 3, 4, 4, 5]
    assert not rig.service.device.broken


@pytest.mark.parametrize("kick", [False, True], ids=["parked", "kicked"])
def test_avail_jump_past_queue_size_breaks(make_rig, kick: bool) -> None:
    rig = make_rig("bh")
    park_after_good_frames(rig, 2)
    for number in range(2, 5):
        rig.raw.frame(number)
    rig.raw.publish(rig.raw.avail_idx + QUEUE_SIZE + 1)
    if kick:
        os.eventfd_write(rig.frontend.kick[TX_QUEUE], 1)
    device = rig.service.device
    assert wait_until(lambda: device.broken)
    time.sleep(0.01)
    # The index itself is invalid, so no chain it covers is trusted.
    assert rig.backend.numbers() == [0, 1]
    assert device.status.needs_reset
    assert_next_connection_serves(rig)


@pytest.mark.parametrize("kick", [False, True], ids=["parked", "kicked"])
def test_frames_in_second_region_sent(make_rig, kick: bool) -> None:
    rig = make_rig("bh")
    rig.frontend.sock.close()
    assert wait_until(lambda: not rig.service.device.queues)
    rig.connect(two_regions=True)
    park_after_good_frames(rig, 2)
    # Frames 2 and 4 lie in the second region, and frames 3 and 5 in the first.
    for number in range(2, 6):
        address = TX_BUFFERS + 0x2_0000 + number * BUFFER_SIZE
        data = HEADER + frame_bytes(number)
        gpa = address
        if number % 2 == 0:
            address = SECOND_REGION_OFFSET + number * BUFFER_SIZE
            gpa = SECOND_REGION_GPA + number * BUFFER_SIZE
        rig.memory.write(address, data)
        rig.raw.put(rig.raw.avail_idx % QUEUE_SIZE, gpa, len(data))
    rig.raw.publish()
    if kick:
        os.eventfd_write(rig.frontend.kick[TX_QUEUE], 1)
    assert wait_until(lambda: len(rig.backend.arrivals) == 6)
    time.sleep(0.01)
    assert rig.backend.numbers() == [0, 1, 2, 3, 4, 5]
    assert not rig.service.device.broken
