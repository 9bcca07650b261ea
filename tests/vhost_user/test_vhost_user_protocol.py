"""Tests of the vhost-user codec: C layouts, framing and payload validation."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.vhost_user.errors import (
    FdCountError,
    HeaderError,
    MemoryTableError,
    PayloadSizeError,
    UnknownRequestError,
    VhostUserError,
)
from device.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    LAYOUT_FORMATS,
    MAX_MEMORY_REGIONS,
    REQUEST_LAYOUTS,
    VERSION,
    VRING_NOFD_FLAG,
    Message,
    MessageReader,
    PayloadLayout,
    ProtocolFeature,
    Request,
    VhostMemoryRegion,
    VringAddress,
    check_regions,
    decode_config,
    decode_memory_region,
    decode_memory_table,
    decode_ring_fd,
    decode_u64,
    decode_vring_address,
    decode_vring_state,
    encode_config,
    encode_memory_region,
    encode_memory_table,
    encode_message,
    encode_reply,
    encode_u64,
    encode_vring_address,
    encode_vring_state,
    ffi,
    request_name,
)

# Sizes stated by QEMU docs/interop/vhost-user.rst ("Payload") and the C
# structs of QEMU 7.2 hw/virtio/vhost-user.c.
SPEC_SIZES = {
    "struct vhost_user_header": 12,
    "struct vhost_vring_state": 8,
    "struct vhost_vring_addr": 40,
    "struct vhost_user_memory_region": 32,
    "struct vhost_user_memory": 8 + 8 * 32,
    "struct vhost_user_mem_reg": 40,
    "struct vhost_user_log": 16,
    "struct vhost_user_config": 12 + 256,
    "struct vhost_user_inflight": 24,
    "struct vhost_iotlb_msg": 32,
    "struct vhost_user_transfer_device_state": 8,
    "struct vhost_user_shared": 16,
}

SPEC_OFFSETS = {
    "struct vhost_user_header": {"request": 0, "flags": 4, "size": 8},
    "struct vhost_vring_state": {"index": 0, "num": 4},
    "struct vhost_vring_addr": {
        "index": 0,
        "flags": 4,
        "desc_user_addr": 8,
        "used_user_addr": 16,
        "avail_user_addr": 24,
        "log_guest_addr": 32,
    },
    "struct vhost_user_memory_region": {
        "guest_phys_addr": 0,
        "memory_size": 8,
        "userspace_addr": 16,
        "mmap_offset": 24,
    },
    "struct vhost_user_memory": {"nregions": 0, "padding": 4, "regions": 8},
    "struct vhost_user_mem_reg": {"padding": 0, "region": 8},
    "struct vhost_user_config": {"offset": 0, "size": 4, "flags": 8, "region": 12},
    "struct vhost_user_inflight": {
        "mmap_size": 0,
        "mmap_offset": 8,
        "num_queues": 16,
        "queue_size": 18,
    },
}


def message(request: Request, payload: bytes = b"", fds: list[int] | None = None):
    return Message(request, VERSION, payload, list(fds or []))


def region(gpa: int, size: int, user: int, offset: int = 0) -> VhostMemoryRegion:
    return VhostMemoryRegion(gpa, size, user, offset)


# -- C layouts ---------------------------------------------------------------


@pytest.mark.parametrize("ctype", sorted(SPEC_SIZES))
def test_layout_size_matches_spec(ctype: str) -> None:
    assert ffi.sizeof(ctype) == SPEC_SIZES[ctype]


@pytest.mark.parametrize("ctype", sorted(SPEC_OFFSETS))
def test_layout_offsets_match_spec(ctype: str) -> None:
    for field_name, offset in SPEC_OFFSETS[ctype].items():
        assert ffi.offsetof(ctype, field_name) == offset, field_name


@pytest.mark.parametrize("ctype", sorted(LAYOUT_FORMATS))
def test_struct_format_matches_cffi(ctype: str) -> None:
    layout = LAYOUT_FORMATS[ctype]
    assert layout.size == ffi.sizeof(ctype)
    # Pack distinct values with struct and read them back through cffi, which
    # checks field order and offsets at once.
    fields = [name for name, _ in ffi.typeof(ctype).fields]
    values = []
    for position, (_name, field_type) in enumerate(ffi.typeof(ctype).fields):
        if field_type.type.kind == "array":
            values.append(bytes(range(1, 17)))
        elif field_type.type.kind == "struct":
            for inner in range(len(field_type.type.fields)):
                values.append(0x1000 * (position + 1) + inner)
        else:
            values.append(position + 1)
    data = layout.pack(*values)
    cdata = ffi.from_buffer(ctype + " *", bytearray(data))
    flat = []
    for name in fields:
        value = getattr(cdata, name)
        if isinstance(value, ffi.CData) and ffi.typeof(value).kind == "struct":
            flat.extend(getattr(value, inner) for inner, _ in ffi.typeof(value).fields)
        elif isinstance(value, ffi.CData):
            flat.append(bytes(ffi.buffer(value)))
        else:
            flat.append(value)
    assert flat == values


def test_memory_table_full_size_matches_c() -> None:
    table = encode_memory_table([region(0, 0x1000, 0x7000)], full=True)
    assert len(table) == ffi.sizeof("struct vhost_user_memory")


# -- enums ----------------------------------------------------------------------


def test_request_codes_match_spec() -> None:
    assert Request.GET_FEATURES == 1
    assert Request.SET_VRING_ENABLE == 18
    assert Request.GET_CONFIG == 24
    assert Request.RESET_DEVICE == 34
    assert Request.GET_MAX_MEM_SLOTS == 36
    assert Request.ADD_MEM_REG == 37
    assert Request.REM_MEM_REG == 38
    assert Request.GET_STATUS == 40
    assert Request.CHECK_DEVICE_STATE == 43
    assert [int(code) for code in Request] == list(range(1, 44))


def test_every_request_has_a_layout() -> None:
    assert set(REQUEST_LAYOUTS) == set(Request)


def test_protocol_feature_bits() -> None:
    assert ProtocolFeature.MQ.mask == 1 << 0
    assert ProtocolFeature.REPLY_ACK.mask == 1 << 3
    assert ProtocolFeature.CONFIGURE_MEM_SLOTS.mask == 1 << 15
    assert ProtocolFeature.STATUS.mask == 1 << 16


def test_request_name_of_unknown_code() -> None:
    assert request_name(9) == "SET_VRING_ADDR"
    assert request_name(99) == "REQUEST_99"


# -- framing --------------------------------------------------------------------


def test_reader_splits_header_and_payload() -> None:
    reader = MessageReader()
    data = encode_message(Request.SET_FEATURES, encode_u64(0x1234))
    assert reader.bytes_needed() == 12
    assert reader.feed(data[:12]) is None
    assert reader.bytes_needed() == 8
    result = reader.feed(data[12:])
    assert result is not None
    assert result.request is Request.SET_FEATURES
    assert decode_u64(result) == 0x1234


def test_reader_byte_by_byte_keeps_fds() -> None:
    reader = MessageReader()
    data = encode_message(Request.SET_VRING_KICK, encode_u64(1))
    results = []
    for position in range(len(data)):
        fds = [42] if position == 0 else []
        results.append(reader.feed(data[position : position + 1], fds))
    assert results[:-1] == [None] * (len(data) - 1)
    assert results[-1] is not None
    assert results[-1].fds == [42]
    assert not reader.in_progress


def test_reader_empty_payload_completes_on_header() -> None:
    reader = MessageReader()
    result = reader.feed(encode_message(Request.GET_FEATURES))
    assert result is not None
    assert result.payload == b""


def test_reader_rejects_overlong_feed() -> None:
    reader = MessageReader()
    with pytest.raises(ValueError, match="needs 12"):
        reader.feed(bytes(13))


def test_reader_need_reply_flag() -> None:
    reader = MessageReader()
    data = encode_message(Request.SET_OWNER, b"", VERSION | FLAG_NEED_REPLY)
    result = reader.feed(data)
    assert result is not None
    assert result.need_reply


@pytest.mark.parametrize("code", [0, 44, 99, 0xFFFFFFFF])
def test_reader_unknown_request(code: int) -> None:
    header = struct.pack("=III", code, VERSION, 0)
    with pytest.raises(UnknownRequestError, match=f"unknown request code {code}"):
        MessageReader().feed(header)


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (0x0, "unsupported version"),
        (0x2, "unsupported version"),
        (VERSION | FLAG_REPLY, "reply flag in a request"),
        (VERSION | 0x10, "unknown flag bits"),
    ],
)
def test_reader_bad_flags(flags: int, reason: str) -> None:
    header = struct.pack("=III", Request.GET_FEATURES, flags, 0)
    with pytest.raises(HeaderError, match=reason):
        MessageReader().feed(header)


def test_reply_reader_requires_reply_flag() -> None:
    with pytest.raises(HeaderError, match="reply flag missing"):
        MessageReader(replies=True).feed(encode_message(Request.GET_FEATURES)[:12])


def test_reply_reader_accepts_reply() -> None:
    reader = MessageReader(replies=True)
    reply = encode_reply(Request.GET_VRING_BASE, encode_vring_state(1, 7))
    assert reader.feed(reply[:12]) is None
    result = reader.feed(reply[12:])
    assert result is not None
    assert decode_vring_state(result).num == 7


@pytest.mark.parametrize(
    ("request_code", "size"),
    [
        (Request.GET_FEATURES, 8),
        (Request.SET_FEATURES, 4),
        (Request.SET_FEATURES, 16),
        (Request.SET_VRING_NUM, 4),
        (Request.SET_VRING_ADDR, 32),
        (Request.SET_VRING_KICK, 0),
        (Request.GET_VRING_BASE, 0),
        (Request.SET_MEM_TABLE, 0),
        (Request.SET_MEM_TABLE, 8 + 20),
        (Request.SET_MEM_TABLE, 8 + 9 * 32),
        (Request.ADD_MEM_REG, 32),
        (Request.SET_LOG_BASE, 8),
        (Request.GET_CONFIG, 11),
        (Request.GET_CONFIG, 12 + 257),
    ],
)
def test_reader_rejects_payload_size(request_code: Request, size: int) -> None:
    header = struct.pack("=III", request_code, VERSION, size)
    with pytest.raises(PayloadSizeError, match=f"{request_code.name}: payload size"):
        MessageReader().feed(header)


def test_payload_size_error_names_expectation() -> None:
    header = struct.pack("=III", Request.SET_VRING_ADDR, VERSION, 8)
    with pytest.raises(PayloadSizeError, match=r"expected 40 bytes \(vring address\)"):
        MessageReader().feed(header)


@pytest.mark.parametrize("layout", list(PayloadLayout))
def test_every_layout_describes_itself(layout: PayloadLayout) -> None:
    assert "bytes" in layout.describe()


def test_reader_rejects_fds_on_plain_request() -> None:
    reader = MessageReader()
    data = encode_message(Request.SET_FEATURES, encode_u64(0))
    reader.feed(data[:12], [5])
    with pytest.raises(FdCountError, match="SET_FEATURES: received 1 file descriptors"):
        reader.feed(data[12:])
    assert reader.take_fds() == [5]


# -- payloads -------------------------------------------------------------------


def test_vring_state_round_trip() -> None:
    state = decode_vring_state(
        message(Request.SET_VRING_NUM, encode_vring_state(3, 256))
    )
    assert (state.index, state.num) == (3, 256)


def test_vring_address_round_trip() -> None:
    address = VringAddress(1, 0, 0x1000, 0x3000, 0x2000, 0x4000)
    encoded = encode_vring_address(address)
    assert decode_vring_address(message(Request.SET_VRING_ADDR, encoded)) == address


def test_u64_wrong_size() -> None:
    with pytest.raises(PayloadSizeError, match="SET_FEATURES: payload size 4"):
        decode_u64(message(Request.SET_FEATURES, bytes(4)))


def test_ring_fd_with_descriptor() -> None:
    msg = message(Request.SET_VRING_CALL, encode_u64(1), [9])
    assert decode_ring_fd(msg) == (1, 9)
    assert msg.fds == []


def test_ring_fd_nofd_flag() -> None:
    msg = message(Request.SET_VRING_KICK, encode_u64(1 | VRING_NOFD_FLAG))
    assert decode_ring_fd(msg) == (1, None)


def test_ring_fd_nofd_with_descriptor() -> None:
    msg = message(Request.SET_VRING_KICK, encode_u64(VRING_NOFD_FLAG), [9])
    with pytest.raises(FdCountError, match="received 1 file descriptors, expected 0"):
        decode_ring_fd(msg)


def test_ring_fd_missing_descriptor() -> None:
    msg = message(Request.SET_VRING_KICK, encode_u64(0))
    with pytest.raises(FdCountError, match="received 0 file descriptors, expected 1"):
        decode_ring_fd(msg)


def test_ring_fd_unknown_bits() -> None:
    msg = message(Request.SET_VRING_ERR, encode_u64(0x200), [9])
    with pytest.raises(HeaderError, match="payload 0x200 has bits set"):
        decode_ring_fd(msg)


def test_memory_table_exact_size() -> None:
    regions = [region(0, 0x1000, 0x7000), region(0x1000, 0x1000, 0x9000, 0x1000)]
    msg = message(Request.SET_MEM_TABLE, encode_memory_table(regions), [5, 6])
    assert decode_memory_table(msg) == regions


def test_memory_table_full_size() -> None:
    regions = [region(0, 0x1000, 0x7000)]
    payload = encode_memory_table(regions, full=True)
    msg = message(Request.SET_MEM_TABLE, payload, [5])
    assert decode_memory_table(msg) == regions


def test_memory_table_empty() -> None:
    assert (
        decode_memory_table(message(Request.SET_MEM_TABLE, encode_memory_table([])))
        == []
    )


def test_memory_table_too_many_regions() -> None:
    payload = struct.pack("=II", MAX_MEMORY_REGIONS + 1, 0) + bytes(8 * 32)
    with pytest.raises(MemoryTableError, match="nregions 9 exceeds the maximum of 8"):
        decode_memory_table(message(Request.SET_MEM_TABLE, payload))


def test_memory_table_size_disagrees_with_nregions() -> None:
    payload = encode_memory_table([region(0, 0x1000, 0x7000)])
    payload = struct.pack("=II", 2, 0) + payload[8:]
    with pytest.raises(PayloadSizeError, match="72 or 264 bytes for 2 regions"):
        decode_memory_table(message(Request.SET_MEM_TABLE, payload, [5, 6]))


@pytest.mark.parametrize("fds", [[], [5, 6]])
def test_memory_table_fd_count(fds: list[int]) -> None:
    payload = encode_memory_table([region(0, 0x1000, 0x7000)])
    with pytest.raises(FdCountError, match=f"received {len(fds)} file descriptors"):
        decode_memory_table(message(Request.SET_MEM_TABLE, payload, fds))


@pytest.mark.parametrize(
    ("regions", "reason"),
    [
        ([region(0, 0, 0x7000)], "size is zero"),
        ([region(0, 0x2000, 0x7000), region(0x1000, 0x1000, 0x20000)], "guest address"),
        ([region(0, 0x1000, 0x7000), region(0x1000, 0x1000, 0x7800)], "user address"),
        ([region(2**64 - 0x1000, 0x2000, 0)], "guest address range overflows"),
        ([region(0, 0x2000, 2**64 - 0x1000)], "user address range overflows"),
        ([region(0, 0x2000, 0, 2**64 - 0x1000)], "mmap offset range overflows"),
    ],
)
def test_check_regions_rejects(regions: list[VhostMemoryRegion], reason: str) -> None:
    with pytest.raises(MemoryTableError, match=reason):
        check_regions("SET_MEM_TABLE", regions)


def test_check_regions_accepts_adjacent() -> None:
    check_regions(
        "SET_MEM_TABLE", [region(0, 0x1000, 0x7000), region(0x1000, 0x1000, 0x8000)]
    )


def test_single_region_round_trip() -> None:
    description = region(0x10000, 0x1000, 0x7000, 0x2000)
    msg = message(Request.ADD_MEM_REG, encode_memory_region(description), [5])
    assert decode_memory_region(msg) == description
    assert msg.fds == [5]


def test_config_round_trip() -> None:
    msg = message(Request.GET_CONFIG, encode_config(4, 0, bytes(6)))
    space, size = decode_config(msg)
    assert (space.offset, space.flags, space.data, size) == (4, 0, bytes(6), 6)


def test_config_size_mismatch() -> None:
    payload = struct.pack("=III", 0, 8, 0) + bytes(6)
    with pytest.raises(PayloadSizeError, match="not 8"):
        decode_config(message(Request.GET_CONFIG, payload))


# -- arbitrary input ------------------------------------------------------------

DECODERS = {
    PayloadLayout.U64: decode_u64,
    PayloadLayout.VRING_STATE: decode_vring_state,
    PayloadLayout.VRING_ADDRESS: decode_vring_address,
    PayloadLayout.MEMORY_TABLE: decode_memory_table,
    PayloadLayout.MEMORY_REGION: decode_memory_region,
    PayloadLayout.CONFIG: decode_config,
}


@settings(max_examples=300, deadline=None)
@given(
    stream=st.binary(max_size=600),
    chunk=st.integers(min_value=1, max_value=64),
    fds=st.lists(st.integers(min_value=100, max_value=200), max_size=3),
)
def test_reader_raises_only_protocol_errors(
    stream: bytes, chunk: int, fds: list[int]
) -> None:
    reader = MessageReader()
    position = 0
    try:
        while position < len(stream):
            size = min(chunk, reader.bytes_needed(), len(stream) - position)
            result = reader.feed(stream[position : position + size], fds)
            position += size
            if result is None:
                continue
            decoder = DECODERS.get(REQUEST_LAYOUTS[result.request])
            if decoder is not None:
                decoder(result)
    except VhostUserError:
        pass


def valid_sizes(layout: PayloadLayout) -> list[int]:
    return [size for size in range(0, 300) if layout.allows(size)]


@st.composite
def well_framed_message(draw: st.DrawFn) -> bytes:
    request = draw(st.sampled_from(list(Request)))
    size = draw(st.sampled_from(valid_sizes(REQUEST_LAYOUTS[request])))
    payload = draw(st.binary(min_size=size, max_size=size))
    return encode_message(request, payload)


@settings(max_examples=500, deadline=None)
@given(messages=st.lists(well_framed_message(), min_size=1, max_size=4))
def test_decoders_raise_only_protocol_errors(messages: list[bytes]) -> None:
    reader = MessageReader()
    for data in messages:
        result = reader.feed(data[:12]) or reader.feed(data[12:])
        assert result is not None
        decoder = DECODERS.get(REQUEST_LAYOUTS[result.request])
        if decoder is None:
            continue
        try:
            decoder(result)
        except VhostUserError:
            pass
