"""Split ring geometry (virtio 1.2, 2.7) and the cffi layouts behind it."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from virtio import DESCRIPTOR_SIZE, MAX_QUEUE_SIZE, RingLayout, UsageError
from virtio import layout as ring_layout
from virtio.cdefs import ffi, offsetof, sizeof

POWERS_OF_TWO = [1 << shift for shift in range(16)]


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


# -- sizes and offsets ------------------------------------------------------------


@pytest.mark.parametrize("size", POWERS_OF_TWO)
def test_packed_layout_geometry(size: int) -> None:
    layout = RingLayout.packed_after(size, 0)

    assert layout.desc == 0
    assert layout.desc_bytes == 16 * size
    assert layout.avail == 16 * size
    assert layout.avail_bytes == 6 + 2 * size
    assert layout.used == align_up(16 * size + 6 + 2 * size, 4)
    assert layout.used_bytes == 6 + 8 * size
    assert layout.end == layout.used + 6 + 8 * size
    assert layout.misalignment() is None


@pytest.mark.parametrize("size", POWERS_OF_TWO)
def test_field_addresses(size: int) -> None:
    layout = RingLayout(size, desc=0x10000, avail=0x20000, used=0x30000)
    last = size - 1

    assert layout.avail_idx_addr == 0x20002
    assert layout.avail_ring_addr(0) == 0x20004
    assert layout.avail_ring_addr(last) == 0x20004 + 2 * last
    assert layout.used_event_addr == 0x20004 + 2 * size
    assert layout.used_idx_addr == 0x30002
    assert layout.used_elem_addr(0) == 0x30004
    assert layout.used_elem_addr(last) == 0x30004 + 8 * last
    assert layout.avail_event_addr == 0x30004 + 8 * size


@pytest.mark.parametrize("size", [0, 3, 6, 100, 32769, 65536, -1, -8])
def test_invalid_queue_sizes_rejected(size: int) -> None:
    with pytest.raises(UsageError, match=f"queue size {size} is invalid"):
        RingLayout(size, 0, 0x1000, 0x2000)
    with pytest.raises(UsageError):
        RingLayout.packed_after(size, 0)
    with pytest.raises(UsageError):
        RingLayout.legacy(size, 0)


def test_max_queue_size_accepted() -> None:
    assert MAX_QUEUE_SIZE == 32768
    assert RingLayout.packed_after(MAX_QUEUE_SIZE, 0).size == 32768


def test_layout_is_frozen() -> None:
    layout = RingLayout.packed_after(8, 0)

    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.size = 16  # type: ignore[misc]


# -- legacy layout --------------------------------------------------------------


@pytest.mark.parametrize("size", POWERS_OF_TWO)
def test_legacy_layout_4096(size: int) -> None:
    base = 0x40000
    layout = RingLayout.legacy(size, base)

    assert layout.desc == base
    assert layout.avail == base + 16 * size
    assert layout.used == base + align_up(16 * size + 2 * (3 + size), 4096)
    assert layout.used % 4096 == 0


@pytest.mark.parametrize(
    ("size", "total"),
    # The legacy vring_size(num, 4096) of the virtio 0.9.5 layout:
    # align(16 * num + 2 * (3 + num), 4096) + 2 * 3 + 8 * num.
    [(1, 4096 + 14), (64, 4096 + 518), (256, 8192 + 2054), (1024, 20480 + 8198)],
)
def test_legacy_total_size(size: int, total: int) -> None:
    assert RingLayout.legacy(size, 0).end == total


def test_legacy_custom_alignment() -> None:
    layout = RingLayout.legacy(8, 0x1000, align=64)

    assert layout.avail == 0x1000 + 128
    assert layout.used == 0x1000 + 192  # 128 + 22 rounded up to 64


# -- alignment rules ------------------------------------------------------------


@pytest.mark.parametrize(
    ("desc", "avail", "used", "part"),
    [
        (0x08, 0x100, 0x200, "descriptor table at 0x8 is not aligned to 16 bytes"),
        (0x00, 0x101, 0x200, "available ring at 0x101 is not aligned to 2 bytes"),
        (0x00, 0x100, 0x202, "used ring at 0x202 is not aligned to 4 bytes"),
    ],
)
def test_misalignment_names_part(desc: int, avail: int, used: int, part: str) -> None:
    assert RingLayout(8, desc, avail, used).misalignment() == part


def test_minimum_alignments_accepted() -> None:
    assert RingLayout(8, 0x10, 0x92, 0x104).misalignment() is None


def test_packed_after_aligns_every_part() -> None:
    layout = RingLayout.packed_after(2, 0x1003)

    assert layout.desc == 0x1010
    assert layout.avail == 0x1030
    assert layout.used == 0x103C  # avail ring of 10 bytes, then 4-byte alignment
    assert layout.misalignment() is None


# -- cffi layouts against the spec's numbers -------------------------------------


@pytest.mark.parametrize(
    ("struct_name", "size"),
    [
        ("struct vring_desc", 16),
        ("struct vring_used_elem", 8),
        ("struct vring_avail", 4),
        ("struct vring_used", 4),
        ("struct virtio_net_hdr", 10),
        ("struct virtio_net_hdr_mrg_rxbuf", 12),
        ("struct virtio_net_hdr_v1_hash", 20),
        ("struct virtio_net_config", 12),
        ("struct virtio_net_ctrl_hdr", 2),
    ],
)
def test_cffi_struct_sizes(struct_name: str, size: int) -> None:
    assert sizeof(struct_name) == size


@pytest.mark.parametrize(
    ("struct_name", "field", "offset"),
    [
        ("struct vring_desc", "addr", 0),
        ("struct vring_desc", "len", 8),
        ("struct vring_desc", "flags", 12),
        ("struct vring_desc", "next", 14),
        ("struct vring_used_elem", "id", 0),
        ("struct vring_used_elem", "len", 4),
        ("struct vring_avail", "idx", 2),
        ("struct vring_avail", "ring", 4),
        ("struct vring_used", "idx", 2),
        ("struct vring_used", "ring", 4),
        ("struct virtio_net_hdr", "flags", 0),
        ("struct virtio_net_hdr", "gso_type", 1),
        ("struct virtio_net_hdr", "hdr_len", 2),
        ("struct virtio_net_hdr", "gso_size", 4),
        ("struct virtio_net_hdr", "csum_start", 6),
        ("struct virtio_net_hdr", "csum_offset", 8),
        ("struct virtio_net_hdr_mrg_rxbuf", "num_buffers", 10),
        ("struct virtio_net_hdr_v1_hash", "hash_value", 12),
        ("struct virtio_net_hdr_v1_hash", "hash_report", 16),
        ("struct virtio_net_hdr_v1_hash", "padding", 18),
        ("struct virtio_net_config", "mac", 0),
        ("struct virtio_net_config", "status", 6),
        ("struct virtio_net_config", "max_virtqueue_pairs", 8),
        ("struct virtio_net_config", "mtu", 10),
    ],
)
def test_cffi_field_offsets(struct_name: str, field: str, offset: int) -> None:
    assert offsetof(struct_name, field) == offset


def test_descriptor_format_matches_cffi() -> None:
    values = (0x1122_3344_5566_7788, 0x99AA_BBCC, 0x0007, 0xDDEE)
    desc = ffi.new("struct vring_desc *")
    desc.addr, desc.len, desc.flags, desc.next = values
    c_bytes = bytes(ffi.buffer(desc))

    assert ring_layout.DESCRIPTOR_FORMAT.size == 16
    assert DESCRIPTOR_SIZE == 16
    assert ring_layout.DESCRIPTOR_FORMAT.pack(*values) == c_bytes
    assert ring_layout.DESCRIPTOR_FORMAT.unpack(c_bytes) == values


def test_used_elem_format_matches_cffi() -> None:
    elem = ffi.new("struct vring_used_elem *")
    elem.id, elem.len = 0x1234, 0xFEDC_BA98

    assert ring_layout.USED_ELEM_SIZE == 8
    assert bytes(ffi.buffer(elem)) == struct.pack("<II", 0x1234, 0xFEDC_BA98)
