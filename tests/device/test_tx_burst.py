"""The TX run path: one-descriptor chains sent to the backend in bursts.

``TxQueue.flush`` takes the run of one-descriptor chains at the front of the
ring with ``DeviceQueue.pop_single``, hands their frames to
``Backend.send_burst`` in one call and completes them with
``add_used_many``. A chain whose header requests an offload goes alone
through the checking path, and any other chain shape goes through the
general per-chain path. These tests drive a whole ``VirtioNetDevice``. The
backend must get every frame once and in ring order, and every head must
come back in the used ring once. BUSY, DROPPED, a queue stop and a ring
violation in the middle of a run must lose and repeat nothing. The
same sequences run against backends without ``send_burst``, which must see
exactly the same frames.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.base import Backend, Buffer, SendStatus, send_each
from backends.loopback import LoopbackBackend
from device import case as case_module
from device.case import CaseBackend, CaseRun, load_case
from device.case_check import InvariantChecker
from device.clock import VirtualClock
from device.features import NetFeature
from device.net_device import VirtioNetDevice
from device.notifier import CallbackInterrupt
from device.tx import FlushResult
from virtio import (
    DeviceStatus,
    GuestMemory,
    MemoryRegion,
    RingLayout,
    VirtioFeature,
)

SENT = SendStatus.SENT
BUSY = SendStatus.BUSY
DROPPED = SendStatus.DROPPED

TX = 1
HEADER_LEN = 12
PLAIN = bytes(HEADER_LEN)
NEXT = 1
INDIRECT = 4
DESC = struct.Struct("<QIHH")
VNET_HEADER = struct.Struct("<BBHHHHH")
NEEDS_CSUM = 1
DATA_VALID = 2
GSO_TCPV4 = 1

MEMORY_SIZE = 0x200000
RING_BASE = 0x1000
DATA_BASE = 0x40000
SLOT_BYTES = 0x1000
"""Each descriptor index owns one slot of guest memory for its buffer or table."""

FEATURES = (
    VirtioFeature.VERSION_1
    | VirtioFeature.INDIRECT_DESC
    | NetFeature.CSUM
    | NetFeature.HOST_TSO4
)
CASES_DIR = Path(__file__).resolve().parents[1] / "cases"


def make_frame(number: int, length: int = 60) -> bytes:
    """Return an Ethernet frame of EtherType 88B5 that carries ``number``."""
    head = bytes.fromhex("020000000001" "020000000002" "88b5")
    body = number.to_bytes(2, "big") + bytes((number + i) & 0xFF for i in range(200))
    return (head + body)[:length].ljust(length, b"\0")


def vlan_frame(number: int, length: int) -> bytes:
    """Return a frame with an 802.1Q tag, ``length`` bytes in all."""
    plain = make_frame(number, length - 4)
    return plain[:12] + b"\x81\x00\x00\x05" + plain[12:]


def vnet_header(
    flags: int = 0,
    gso_type: int = 0,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
) -> bytes:
    """Return a 12-byte virtio_net_hdr (num_buffers 0)."""
    return VNET_HEADER.pack(
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0
    )


#: A valid TCPv4 segmentation request for a frame of 60 bytes or more.
TSO4_HEADER = vnet_header(NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16)


# -- backends ---------------------------------------------------------------------


class RecordingBackend(Backend):
    """A backend with ``send_burst`` that records every frame offered to it.

    ``statuses`` are the results for the next frames offered, one per frame
    and whichever method offers it. ``plans`` maps the bytes of a frame to
    the results of its own successive offers and comes first. Once both run
    out, every frame is SENT.
    ``offers`` lists every frame offered (header and frame bytes),
    ``accepted`` the ones that were SENT, ``bursts`` the frames of each
    ``send_burst`` call and ``singles`` the frames offered through ``send``
    or ``send_gather``.
    """

    takes_offloads = True

    def __init__(
        self,
        statuses: Sequence[SendStatus] = (),
        plans: Mapping[bytes, Sequence[SendStatus]] | None = None,
    ) -> None:
        super().__init__()
        self.statuses = collections.deque(statuses)
        self.plans = {
            data: collections.deque(plan) for data, plan in (plans or {}).items()
        }
        self.offers: list[bytes] = []
        self.accepted: list[bytes] = []
        self.bursts: list[list[bytes]] = []
        self.singles: list[bytes] = []

    def _offer(self, data: bytes) -> SendStatus:
        self.offers.append(data)
        plan = self.plans.get(data)
        if plan:
            status = plan.popleft()
        elif self.statuses:
            status = self.statuses.popleft()
        else:
            status = SENT
        if status is SENT:
            self.accepted.append(data)
            self.frames_sent += 1
            self.bytes_sent += len(data) - self.header_size
        elif status is BUSY:
            self.send_busy += 1
        else:
            self.drops["answered-dropped"] += 1
        return status

    def send(self, header: Buffer, frame: Sequence[Buffer]) -> SendStatus:
        data = bytes(header) + b"".join(bytes(part) for part in frame)
        self.singles.append(data)
        return self._offer(data)

    def send_gather(self, buffers: Sequence[Buffer]) -> SendStatus:
        data = b"".join(bytes(buffer) for buffer in buffers)
        self.singles.append(data)
        return self._offer(data)

    def send_burst(self, frames: Sequence[Buffer]) -> tuple[int, SendStatus]:
        copies = [bytes(frame) for frame in frames]
        self.bursts.append(copies)
        for sent, data in enumerate(copies):
            status = self._offer(data)
            if status is not SENT:
                return sent, status
        return len(copies), SENT


class ChecksumRecorder(RecordingBackend):
    """A recorder that cannot pass headers on, so the device completes checksums."""

    takes_offloads = False


class PerFrameBackend(RecordingBackend):
    """The same recorder without ``send_burst``: the device sends frame by frame."""

    send_burst = None


class OffloadLoopback(LoopbackBackend):
    """A LoopbackBackend that passes headers on, so the device offers offloads."""

    takes_offloads = True


BACKENDS = {
    "burst": RecordingBackend,
    "per-frame": PerFrameBackend,
    "loopback": OffloadLoopback,
}


def accepted_frames(backend: Backend) -> list[bytes]:
    """Return the header and frame bytes of every frame the backend took."""
    if isinstance(backend, RecordingBackend):
        return list(backend.accepted)
    assert isinstance(backend, LoopbackBackend)
    frames = []
    while (record := backend.pop_sent()) is not None:
        frames.append(record[0] + record[1])
    return frames


# -- the driver side ----------------------------------------------------------------


class Guest:
    """The driver's half of the TX ring, written straight into guest memory.

    Descriptor index ``i`` keeps its buffer (or indirect table and buffers)
    in slot ``i`` of the data area. Heads come back to the free list when
    ``reclaim`` finds them in the used ring.
    """

    def __init__(self, memory: GuestMemory, layout: RingLayout, start: int) -> None:
        self.memory = memory
        self.layout = layout
        self.avail_idx = start
        self.used_seen = start
        self.free = list(range(layout.size))
        self.chain_descriptors: dict[int, list[int]] = {}
        self.write_u16(layout.avail_idx_addr, start)
        self.write_u16(layout.used_idx_addr, start)

    def write_u16(self, address: int, value: int) -> None:
        self.memory.write(address, struct.pack("<H", value & 0xFFFF))

    def read_u16(self, address: int) -> int:
        return struct.unpack("<H", self.memory.read(address, 2))[0]

    def slot(self, index: int) -> int:
        return DATA_BASE + index * SLOT_BYTES

    def desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0):
        self.memory.write(
            self.layout.desc + 16 * index, DESC.pack(addr, length, flags, nxt)
        )

    def add(self, data: bytes, cuts: Sequence[int] = ()) -> int:
        """Write ``data`` as a chain of direct descriptors cut at ``cuts``; post it."""
        pieces = split(data, cuts)
        indices = [self.free.pop(0) for _ in pieces]
        for position, (index, piece) in enumerate(zip(indices, pieces)):
            self.memory.write(self.slot(index), piece)
            last = position == len(pieces) - 1
            nxt = 0 if last else indices[position + 1]
            self.desc(index, self.slot(index), len(piece), 0 if last else NEXT, nxt)
        return self.post(indices[0], indices)

    def add_indirect(self, data: bytes, cuts: Sequence[int] = ()) -> int:
        """Write ``data`` through one INDIRECT descriptor; post it."""
        pieces = split(data, cuts)
        index = self.free.pop(0)
        table = self.slot(index)
        address = table + 0x100
        entries = b""
        for position, piece in enumerate(pieces):
            self.memory.write(address, piece)
            last = position == len(pieces) - 1
            entries += DESC.pack(address, len(piece), 0 if last else NEXT, position + 1)
            address += len(piece)
        self.memory.write(table, entries)
        self.desc(index, table, len(entries), INDIRECT)
        return self.post(index, [index])

    def post(self, head: int, indices: list[int] | None = None) -> int:
        """Put ``head`` in the next avail slot and publish avail.idx."""
        if indices is not None:
            self.chain_descriptors[head] = indices
        slot = self.avail_idx % self.layout.size
        self.write_u16(self.layout.avail_ring_addr(slot), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.write_u16(self.layout.avail_idx_addr, self.avail_idx)
        return head

    @property
    def used_idx(self) -> int:
        return self.read_u16(self.layout.used_idx_addr)

    def used_elem(self, position: int) -> tuple[int, int]:
        slot = position % self.layout.size
        return struct.unpack(
            "<II", self.memory.read(self.layout.used_elem_addr(slot), 8)
        )

    def reclaim(self) -> list[tuple[int, int]]:
        """Return the used elements published since the last call; free their heads."""
        elements = []
        while self.used_seen != self.used_idx:
            head, length = self.used_elem(self.used_seen)
            elements.append((head, length))
            self.free.extend(self.chain_descriptors.pop(head))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return elements


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[start:end] for start, end in zip(bounds, bounds[1:])]


def start_device(
    backend: Backend,
    *,
    size: int = 32,
    mtu: int | None = None,
    event_idx: bool = False,
    start: int = 0,
    tx_burst: int = 256,
    features: int = FEATURES,
) -> tuple[VirtioNetDevice, Guest]:
    """Bring a device up with only the TX queue, its indices at ``start``."""
    memory = GuestMemory([MemoryRegion(0, bytearray(MEMORY_SIZE))])
    layout = RingLayout.packed_after(size, RING_BASE)
    guest = Guest(memory, layout, start)
    device = VirtioNetDevice(
        backend,
        clock=VirtualClock(),
        interrupts=CallbackInterrupt(),
        tx_mode="immediate",
        tx_burst=tx_burst,
        mtu=mtu or 1500,
    )
    if event_idx:
        features |= VirtioFeature.EVENT_IDX
    if mtu is not None:
        features |= NetFeature.MTU
    acknowledge = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
    device.write_status(DeviceStatus.ACKNOWLEDGE)
    device.write_status(acknowledge)
    device.write_driver_features(features)
    device.write_status(acknowledge | DeviceStatus.FEATURES_OK)
    device.set_memory(memory)
    device.setup_queue(TX, layout, start, start)
    device.write_status(acknowledge | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK)
    assert device.running
    return device, guest


def restart_tx(device: VirtioNetDevice, guest: Guest, last_avail_idx: int) -> None:
    """Start the stopped TX queue again from ``last_avail_idx`` (SET_VRING_BASE).

    The device releases guest memory once no queue runs, so it gets it again.
    """
    device.set_memory(guest.memory)
    device.setup_queue(TX, guest.layout, last_avail_idx, guest.used_idx)


# -- runs of plain frames ---------------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
def test_plain_run_in_one_burst(kind: str) -> None:
    backend = BACKENDS[kind]()
    device, guest = start_device(backend)
    frames = [make_frame(n, 60 + n) for n in range(6)]
    # Heads out of order, so that ring order and head order differ.
    guest.free = [4, 0, 5, 3, 1, 2] + list(range(6, 32))
    heads = [guest.add(PLAIN + frame) for frame in frames]

    done = device.tx.flush(64)

    assert done == 6
    assert accepted_frames(backend) == [PLAIN + frame for frame in frames]
    if kind == "burst":
        assert backend.bursts == [[PLAIN + frame for frame in frames]]
        assert backend.singles == []
    assert guest.reclaim() == [(head, 0) for head in heads]
    stats = device.stats.queue(TX)
    assert stats.frames == 6
    assert stats.bytes == sum(map(len, frames))
    assert not stats.drops
    assert device.tx.queue.inuse == 0


def test_burst_limit_respected() -> None:
    backend = RecordingBackend()
    device, guest = start_device(backend)
    frames = [make_frame(n) for n in range(10)]
    heads = [guest.add(PLAIN + frame) for frame in frames]
    queue = device.tx.queue

    assert device.tx.flush(4) == 4
    assert backend.bursts == [[PLAIN + frame for frame in frames[:4]]]
    assert queue.last_avail_idx == 4
    assert guest.used_idx == 4
    assert device.tx.flush(4) == 4
    assert queue.last_avail_idx == 8
    assert device.tx.flush(4) == 2
    assert [len(burst) for burst in backend.bursts] == [4, 4, 2]
    assert backend.accepted == [PLAIN + frame for frame in frames]
    assert guest.reclaim() == [(head, 0) for head in heads]


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("burst", [1, 2, 3, 5, 64])
def test_burst_limit_over_mixed_shapes(kind: str, burst: int) -> None:
    backend = BACKENDS[kind]()
    device, guest = start_device(backend)
    frames = [make_frame(n) for n in range(9)]
    layouts = [(), (), (12,), (), (5, 30), (), (), (12,), ()]
    heads = [guest.add(PLAIN + frame, cuts) for frame, cuts in zip(frames, layouts)]
    queue = device.tx.queue

    counts = []
    while queue.last_avail_idx != guest.avail_idx:
        before = queue.last_avail_idx
        done = device.tx.flush(burst)
        assert isinstance(done, int)
        assert 0 < done <= burst
        assert queue.last_avail_idx == before + done
        counts.append(done)

    assert sum(counts) == 9
    assert accepted_frames(backend) == [PLAIN + frame for frame in frames]
    assert guest.reclaim() == [(head, 0) for head in heads]
    if kind == "burst":
        assert all(len(calls) <= burst for calls in backend.bursts)


# -- frames whose header needs the checking path -----------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
def test_offload_frame_sent_alone(kind: str) -> None:
    backend = BACKENDS[kind]()
    device, guest = start_device(backend)
    frame_len = 60
    # NEEDS_CSUM with the 2-byte checksum field ending exactly at the end of
    # the frame is valid; one byte further it lies outside the frame.
    csum_at_end = vnet_header(NEEDS_CSUM, csum_start=40, csum_offset=18)
    csum_past_end = vnet_header(NEEDS_CSUM, csum_start=41, csum_offset=18)
    gso_without_csum = vnet_header(0, GSO_TCPV4, 54, 1448)
    data_valid = vnet_header(DATA_VALID)
    headers = [
        PLAIN,
        PLAIN,
        TSO4_HEADER,
        PLAIN,
        csum_at_end,
        csum_past_end,
        PLAIN,
        gso_without_csum,
        data_valid,
        PLAIN,
    ]
    packets = [header + make_frame(n, frame_len) for n, header in enumerate(headers)]
    heads = [guest.add(packet) for packet in packets]

    done = device.tx.flush(64)

    assert done == len(packets)
    dropped = {5, 7}
    expected = [packet for n, packet in enumerate(packets) if n not in dropped]
    assert accepted_frames(backend) == expected
    assert guest.reclaim() == [(head, 0) for head in heads]
    stats = device.stats.queue(TX)
    assert stats.drops == {"bad-csum-offset": 1, "bad-gso": 1}
    assert stats.frames == len(expected)
    assert stats.bytes == len(expected) * frame_len
    if kind == "burst":
        assert backend.singles == [packets[2], packets[8]]
        in_bursts = [data for burst in backend.bursts for data in burst]
        assert in_bursts == [packets[n] for n in (0, 1, 3, 4, 6, 9)]


def test_long_frames_take_general_path() -> None:
    backend = RecordingBackend()
    device, guest = start_device(backend, mtu=100)
    # With MTU 100 a run takes frames up to 114 bytes. A tagged frame of
    # 118 bytes is still within the MTU; one of 119 bytes is not.
    frames = [
        make_frame(0, 114),
        vlan_frame(1, 118),
        make_frame(2),
        vlan_frame(3, 119),
        make_frame(4),
        make_frame(5),
    ]
    heads = [guest.add(PLAIN + frame) for frame in frames]

    assert device.tx.flush(64) == 6

    expected = [PLAIN + frames[n] for n in (0, 1, 2, 4, 5)]
    assert backend.accepted == expected
    assert backend.singles == [PLAIN + frames[1]]
    assert backend.bursts == [[PLAIN + frames[0]], [PLAIN + frames[2]], expected[3:]]
    assert device.stats.queue(TX).drops == {"frame-too-large": 1}
    assert guest.reclaim() == [(head, 0) for head in heads]


def ones_complement_checksum(data: bytes) -> int:
    """Return the Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def test_software_checksum_frame_leaves_run() -> None:
    # The backend takes no header, so the device fills in a NEEDS_CSUM
    # checksum itself, which a burst of raw buffers cannot do.
    backend = ChecksumRecorder()
    features = VirtioFeature.VERSION_1 | NetFeature.CSUM
    device, guest = start_device(backend, features=features)
    frames = [make_frame(n) for n in range(4)]
    partial = vnet_header(NEEDS_CSUM, csum_start=34, csum_offset=16)
    packets = [PLAIN + frames[0], partial + frames[1]]
    packets += [PLAIN + frames[2], PLAIN + frames[3]]
    heads = [guest.add(packet) for packet in packets]

    assert device.tx.flush(64) == 4

    # The sum covers the partial (pseudo-header) value the driver left in
    # the field, and the result replaces it.
    completed = bytearray(frames[1])
    checksum = ones_complement_checksum(bytes(completed[34:]))
    struct.pack_into("!H", completed, 50, checksum)
    assert backend.accepted == [packets[0], PLAIN + completed, packets[2], packets[3]]
    assert backend.singles == [PLAIN + completed]
    assert backend.bursts == [[packets[0]], packets[2:]]
    assert guest.reclaim() == [(head, 0) for head in heads]


# -- BUSY -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["burst", "per-frame"])
@pytest.mark.parametrize("busy_at", [0, 2, 5])
def test_busy_mid_run_gives_back_rest(kind: str, busy_at: int) -> None:
    backend = BACKENDS[kind]([SENT] * busy_at + [BUSY])
    device, guest = start_device(backend)
    packets = [PLAIN + make_frame(n) for n in range(6)]
    heads = [guest.add(packet) for packet in packets]
    tx = device.tx
    queue = tx.queue

    assert tx.flush(64) is FlushResult.BUSY

    assert backend.accepted == packets[:busy_at]
    assert guest.reclaim() == [(head, 0) for head in heads[:busy_at]]
    assert tx.pending is not None
    assert tx.pending.head == heads[busy_at]
    assert queue.last_avail_idx == busy_at + 1
    assert queue.inuse == 1
    assert device.stats.queue(TX).frames == busy_at
    # A flush while the chain is pending sends nothing.
    assert tx.flush(64) is FlushResult.BUSY
    assert len(backend.offers) == busy_at + 1

    assert tx.resume() is True

    assert backend.accepted == packets[: busy_at + 1]
    assert guest.reclaim() == [(heads[busy_at], 0)]
    assert tx.flush(64) == 5 - busy_at
    assert backend.accepted == packets
    assert backend.offers.count(packets[busy_at]) == 2
    assert len(backend.offers) == 7
    assert guest.reclaim() == [(head, 0) for head in heads[busy_at + 1 :]]
    stats = device.stats.queue(TX)
    assert stats.frames == 6
    assert stats.bytes == 6 * 60
    assert queue.inuse == 0
    if kind == "burst" and busy_at < 5:
        # What was given back goes out together on the next flush.
        assert backend.bursts[-1] == packets[busy_at + 1 :]


def test_busy_on_offload_frame_in_run() -> None:
    backend = RecordingBackend([SENT, SENT, BUSY])
    device, guest = start_device(backend)
    packets = [PLAIN + make_frame(0), PLAIN + make_frame(1)]
    packets.append(TSO4_HEADER + make_frame(2))
    packets += [PLAIN + make_frame(3), PLAIN + make_frame(4)]
    heads = [guest.add(packet) for packet in packets]
    tx = device.tx

    assert tx.flush(64) is FlushResult.BUSY

    assert backend.accepted == packets[:2]
    assert tx.pending.head == heads[2]
    assert tx.queue.last_avail_idx == 3
    assert tx.resume() is True
    assert tx.flush(64) == 2
    assert backend.accepted == packets
    assert backend.singles == [packets[2], packets[2]]
    assert backend.bursts == [packets[:2], packets[3:]]
    assert guest.reclaim() == [(head, 0) for head in heads]


def test_busy_after_backend_drop_in_same_run() -> None:
    backend = RecordingBackend([SENT, DROPPED, BUSY])
    device, guest = start_device(backend)
    packets = [PLAIN + make_frame(n) for n in range(5)]
    heads = [guest.add(packet) for packet in packets]
    tx = device.tx

    assert tx.flush(64) is FlushResult.BUSY

    assert backend.bursts == [packets, packets[2:]]
    assert guest.reclaim() == [(heads[0], 0), (heads[1], 0)]
    assert tx.pending.head == heads[2]
    assert tx.queue.last_avail_idx == 3
    assert tx.resume() is True
    assert tx.flush(64) == 2
    assert backend.accepted == [packets[0]] + packets[2:]
    assert device.stats.queue(TX).drops == {"backend-rejected": 1}
    assert guest.reclaim() == [(head, 0) for head in heads[2:]]


@pytest.mark.parametrize("kind", ["burst", "per-frame"])
@pytest.mark.parametrize("event_idx", [False, True])
def test_stop_gives_back_pending_chain(kind: str, event_idx: bool) -> None:
    # The second BUSY comes from the send that stop() tries first.
    backend = BACKENDS[kind]([SENT, SENT, BUSY, BUSY])
    device, guest = start_device(backend, event_idx=event_idx)
    packets = [PLAIN + make_frame(n) for n in range(6)]
    heads = [guest.add(packet) for packet in packets]
    assert device.tx.flush(64) is FlushResult.BUSY
    assert device.tx.queue.last_avail_idx == 3

    last_avail_idx = device.stop_queue(TX)

    assert last_avail_idx == 2
    assert backend.accepted == packets[:2]
    assert guest.reclaim() == [(heads[0], 0), (heads[1], 0)]

    restart_tx(device, guest, last_avail_idx)
    if device.tx.queue.last_avail_idx != guest.avail_idx:
        assert device.tx.flush(64) == 4

    assert backend.accepted == packets
    assert backend.offers.count(packets[2]) == 3
    assert guest.reclaim() == [(head, 0) for head in heads[2:]]
    assert device.stats.queue(TX).frames == 6


def test_stop_sends_pending_when_ready() -> None:
    backend = RecordingBackend([SENT, SENT, BUSY])
    device, guest = start_device(backend)
    packets = [PLAIN + make_frame(n) for n in range(6)]
    heads = [guest.add(packet) for packet in packets]
    assert device.tx.flush(64) is FlushResult.BUSY

    last_avail_idx = device.stop_queue(TX)

    assert last_avail_idx == 3
    assert backend.accepted == packets[:3]
    assert guest.reclaim() == [(head, 0) for head in heads[:3]]
    restart_tx(device, guest, last_avail_idx)
    assert backend.accepted == packets
    assert guest.reclaim() == [(head, 0) for head in heads[3:]]


# -- DROPPED ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["burst", "per-frame"])
@pytest.mark.parametrize("drop_at", [0, 2, 4])
def test_backend_drop_mid_run(kind: str, drop_at: int) -> None:
    backend = BACKENDS[kind]([SENT] * drop_at + [DROPPED])
    device, guest = start_device(backend)
    frames = [make_frame(n, 60 + n) for n in range(5)]
    heads = [guest.add(PLAIN + frame) for frame in frames]

    assert device.tx.flush(64) == 5

    sent = [frame for n, frame in enumerate(frames) if n != drop_at]
    assert accepted_frames(backend) == [PLAIN + frame for frame in sent]
    assert guest.reclaim() == [(head, 0) for head in heads]
    stats = device.stats.queue(TX)
    assert stats.drops == {"backend-rejected": 1}
    assert stats.frames == 4
    assert stats.bytes == sum(map(len, sent))
    assert device.tx.pending is None
    if kind == "burst" and drop_at < 4:
        assert backend.bursts[-1] == [PLAIN + frame for frame in frames[drop_at + 1 :]]


# -- chain shapes -----------------------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
def test_mixed_shapes_keep_ring_order(kind: str) -> None:
    backend = BACKENDS[kind]()
    device, guest = start_device(backend)
    frames = [make_frame(n, 60 + 3 * n) for n in range(10)]
    heads = [
        guest.add(PLAIN + frames[0]),
        guest.add(PLAIN + frames[1], (12,)),
        guest.add(PLAIN + frames[2]),
        guest.add(PLAIN + frames[3]),
        guest.add_indirect(PLAIN + frames[4], (12,)),
        guest.add_indirect(PLAIN + frames[5]),
        guest.add(PLAIN + frames[6]),
        guest.add(PLAIN + frames[7], (30, 45)),
        guest.add(PLAIN + frames[8]),
        guest.add(PLAIN + frames[9]),
    ]

    assert device.tx.flush(64) == 10

    assert accepted_frames(backend) == [PLAIN + frame for frame in frames]
    assert guest.reclaim() == [(head, 0) for head in heads]
    stats = device.stats.queue(TX)
    assert stats.frames == 10
    assert stats.bytes == sum(map(len, frames))
    if kind == "burst":
        # The general path takes each chain that ends a run and the next
        # chain of one buffer, then hands back to the run path.
        in_bursts = [data for burst in backend.bursts for data in burst]
        assert in_bursts == [PLAIN + frames[n] for n in (0, 3, 6, 9)]


# -- ring violations --------------------------------------------------------------


def post_head_out_of_range(guest: Guest) -> None:
    guest.post(guest.layout.size)


def post_next_out_of_range(guest: Guest) -> None:
    index = guest.free.pop(0)
    guest.memory.write(guest.slot(index), PLAIN)
    guest.desc(index, guest.slot(index), HEADER_LEN, NEXT, guest.layout.size + 3)
    guest.post(index, [index])


def post_short_indirect_table(guest: Guest) -> None:
    index = guest.free.pop(0)
    guest.desc(index, guest.slot(index), 10, INDIRECT)
    guest.post(index, [index])


VIOLATIONS = {
    "head-out-of-range": post_head_out_of_range,
    "next-out-of-range": post_next_out_of_range,
    "bad-indirect-table": post_short_indirect_table,
}


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("violation", VIOLATIONS)
def test_ring_violation_after_run(kind: str, violation: str) -> None:
    backend = BACKENDS[kind]()
    device, guest = start_device(backend)
    packets = [PLAIN + make_frame(n) for n in range(4)]
    packets[2] = TSO4_HEADER + make_frame(2)
    heads = [guest.add(packet) for packet in packets]
    VIOLATIONS[violation](guest)
    guest.add(PLAIN + make_frame(9))

    assert device.tx.flush(64) is FlushResult.BROKEN

    assert accepted_frames(backend) == packets
    assert guest.used_idx == 4
    assert [guest.used_elem(n) for n in range(4)] == [(head, 0) for head in heads]
    assert device.status.value & DeviceStatus.DEVICE_NEEDS_RESET
    assert device.error is not None
    assert device.error.kind == violation
    assert device.stats.queue(TX).frames == 4


def test_avail_index_jump_sends_nothing() -> None:
    backend = RecordingBackend()
    device, guest = start_device(backend, size=8)
    for n in range(3):
        guest.add(PLAIN + make_frame(n))
    guest.write_u16(guest.layout.avail_idx_addr, 9 + 3)

    assert device.tx.flush(64) is FlushResult.BROKEN

    assert backend.offers == []
    assert guest.used_idx == 0
    assert device.error.kind == "avail-index-jump"
    assert device.status.value & DeviceStatus.DEVICE_NEEDS_RESET


# -- random rings and backend statuses ----------------------------------------------

SHAPE_WEIGHTS = {
    "plain": 6,
    "csum": 2,
    "offload": 2,
    "bad-gso": 1,
    "two": 1,
    "indirect": 1,
    "short": 1,
    "empty": 1,
    "long": 1,
}
"""How often each chain shape is drawn: mostly plain, so that runs form."""
SHAPE_MTU = 100
"""MTU the random test negotiates, so that a "long" frame stays small."""


def build_packet(shape: str, number: int, length: int) -> tuple[bytes, str | None]:
    """Return the header and frame bytes of one chain and its device drop reason.

    Frames without a GSO type may be at most SHAPE_MTU + 14 bytes long, since
    none carries a VLAN tag.
    """
    too_long = length > SHAPE_MTU + 14
    if shape == "short":
        return bytes(1 + length % (HEADER_LEN - 1)), "header-incomplete"
    if shape == "empty":
        return PLAIN, "frame-empty"
    if shape == "long":
        return PLAIN + make_frame(number, SHAPE_MTU + 19 + length), "frame-too-large"
    frame = make_frame(number, length)
    if shape == "offload":
        return TSO4_HEADER + frame, None
    if shape == "bad-gso":
        # Segmentation without NEEDS_CSUM, which the device must not pass on.
        return vnet_header(0, GSO_TCPV4, 54, 1448) + frame, "bad-gso"
    if too_long:
        reason: str | None = "frame-too-large"
    else:
        reason = None
    if shape == "csum":
        # The checksum field ends at the end of the frame or one byte after.
        start = length - 18 + number % 2
        header = vnet_header(NEEDS_CSUM, csum_start=start, csum_offset=16)
        if number % 2 and reason is None:
            reason = "bad-csum-offset"
        return header + frame, reason
    return PLAIN + frame, reason


def expected_outcome(
    packets: list[tuple[bytes, str | None]],
    plans: Mapping[bytes, Sequence[SendStatus]],
) -> tuple[list[bytes], list[bytes], collections.Counter[str]]:
    """Model the device: return the frames offered, those accepted, and the drops.

    The device offers each frame it does not drop itself, in ring order, and
    offers it again after BUSY until the backend takes or drops it.
    """
    offers: list[bytes] = []
    accepted: list[bytes] = []
    drops: collections.Counter[str] = collections.Counter()
    for data, reason in packets:
        if reason is not None:
            drops[reason] += 1
            continue
        remaining = collections.deque(plans.get(data, ()))
        while True:
            offers.append(data)
            status = remaining.popleft() if remaining else SENT
            if status is SENT:
                accepted.append(data)
                break
            if status is DROPPED:
                drops["backend-rejected"] += 1
                break
    return offers, accepted, drops


SHAPES = [shape for shape, weight in SHAPE_WEIGHTS.items() for _ in range(weight)]
PLANS = [(), (), (BUSY,), (DROPPED,), (BUSY, BUSY), (BUSY, DROPPED)]
"""Backend results for the successive offers of one frame, before SENT."""
# A group is a shape, a count of chains of that shape in a row, the length
# of the first frame, a plan of backend results and the frame it applies to.
# So BUSY and DROPPED often come in the middle of a run.
group_strategy = st.tuples(
    st.sampled_from(SHAPES),
    st.integers(1, 6),
    st.integers(60, 120),
    st.sampled_from(PLANS),
    st.integers(0, 5),
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    groups=st.lists(group_strategy, min_size=1, max_size=12),
    burst=st.integers(1, 9),
    size=st.sampled_from([8, 16]),
    start=st.sampled_from([0, 0xFFF5]),
    event_idx=st.booleans(),
    burst_backend=st.booleans(),
    steps=st.lists(st.sampled_from(["resume", "stop"]), max_size=200),
)
def test_random_rings_send_each_frame_once(
    groups: list[tuple[str, int, int, tuple[SendStatus, ...], int]],
    burst: int,
    size: int,
    start: int,
    event_idx: bool,
    burst_backend: bool,
    steps: list[str],
) -> None:
    chains = []
    plan_of_chain: dict[int, tuple[SendStatus, ...]] = {}
    for shape, count, length, plan, plan_at in groups:
        for offset in range(count):
            if offset == plan_at % count:
                plan_of_chain[len(chains)] = plan
            chains.append((shape, min(120, length + offset)))
    packets = [
        build_packet(shape, number, length)
        for number, (shape, length) in enumerate(chains)
    ]
    plans = {packets[number][0]: plan for number, plan in plan_of_chain.items()}
    backend_class = RecordingBackend if burst_backend else PerFrameBackend
    backend = backend_class(plans=plans)
    device, guest = start_device(
        backend,
        size=size,
        mtu=SHAPE_MTU,
        event_idx=event_idx,
        start=start,
        tx_burst=burst,
    )
    posted: list[int] = []
    used: list[tuple[int, int]] = []
    choices = collections.deque(steps)
    waiting = collections.deque(zip(chains, packets))

    for _ in range(1000):
        # The driver posts whatever fits in the free descriptors.
        while waiting:
            (shape, _length), (data, _reason) = waiting[0]
            needed = 2 if shape == "two" else 1
            if len(guest.free) < needed:
                break
            waiting.popleft()
            if shape == "two":
                # The header alone, or with the start of the frame, first.
                cut = HEADER_LEN if len(posted) % 2 else 30
                posted.append(guest.add(data, (cut,)))
            elif shape == "indirect":
                posted.append(guest.add_indirect(data, (7,)))
            else:
                posted.append(guest.add(data))
        tx = device.tx
        if tx.pending is not None:
            if (choices.popleft() if choices else "resume") == "stop":
                last_avail_idx = device.stop_queue(TX)
                restart_tx(device, guest, last_avail_idx)
            else:
                tx.resume()
        else:
            result = tx.flush(burst)
            assert result is not FlushResult.BROKEN
            if isinstance(result, int):
                assert result <= burst
        used += guest.reclaim()
        queue = device.tx.queue
        drained = queue.last_avail_idx == guest.avail_idx and queue.inuse == 0
        if not waiting and drained and device.tx.pending is None:
            break
    else:
        pytest.fail("the ring was not drained after 1000 device steps")

    offers, accepted, drops = expected_outcome(packets, plans)
    assert backend.accepted == accepted
    assert backend.offers == offers
    assert device.stats.queue(TX).drops == drops
    assert device.stats.queue(TX).frames == len(accepted)
    assert device.stats.queue(TX).bytes == sum(len(d) - HEADER_LEN for d in accepted)
    assert used == [(head, 0) for head in posted]
    assert device.running


# -- the case corpus with a burst backend ----------------------------------------


class BurstCaseBackend(CaseBackend):
    """The case runner's backend with ``send_burst``, built from ``send_gather``."""

    def send_burst(self, frames: Sequence[Buffer]) -> tuple[int, SendStatus]:
        return send_each(self.send_gather, frames)


CASES = sorted(CASES_DIR.glob("*.json"))


@pytest.mark.parametrize("path", CASES, ids=[path.stem for path in CASES])
def test_case_replays_with_burst_backend(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = load_case(path)
    expected = CaseRun(case).run()
    monkeypatch.setattr(case_module, "CaseBackend", BurstCaseBackend)
    checker = InvariantChecker()
    run = CaseRun(case, checker)

    result = run.run()

    assert isinstance(run.backend, BurstCaseBackend)
    assert result == expected
    assert run.check(result) == []
    assert checker.violations == []
