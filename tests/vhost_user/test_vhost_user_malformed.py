"""Each malformed message closes its connection, and the next front-end is served."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from vhost_user_fakes import (
    GUEST_SIZE,
    GUEST_USER_ADDR,
    QUEUE_SIZE,
    FakeDevice,
    FakeFrontend,
    Harness,
    open_fds,
)

from device.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    VERSION,
    VRING_F_LOG,
    VRING_NOFD_FLAG,
    ProtocolFeature,
    Request,
    VhostMemoryRegion,
    VringAddress,
    decode_u64,
    encode_memory_table,
    encode_message,
    encode_u64,
    encode_vring_address,
    encode_vring_state,
)


@dataclass(frozen=True)
class Case:
    """A malformed exchange, the error kind it must count and its log text."""

    name: str
    send: Callable[[FakeFrontend, FakeDevice], None]
    kind: str
    text: str


def region(gpa: int, size: int, user: int) -> VhostMemoryRegion:
    return VhostMemoryRegion(gpa, size, user, 0)


def mem_table(
    frontend: FakeFrontend, regions: list[VhostMemoryRegion], fds: int
) -> None:
    payload = encode_memory_table(regions)
    frontend.send(Request.SET_MEM_TABLE, payload, [frontend.memfd] * fds)


def ring_setup(frontend: FakeFrontend, address: VringAddress) -> None:
    frontend.negotiate()
    frontend.set_mem_table()
    frontend.send(Request.SET_VRING_NUM, encode_vring_state(0, QUEUE_SIZE))
    frontend.send(Request.SET_VRING_ADDR, encode_vring_address(address))


def ring_at(
    frontend: FakeFrontend, desc_user_addr: int, flags: int = 0
) -> VringAddress:
    good = frontend.ring_address(0)
    return VringAddress(
        0, flags, desc_user_addr, good.used_user_addr, good.avail_user_addr, 0
    )


def start_then_resize(frontend: FakeFrontend, device: FakeDevice) -> None:
    frontend.start()
    frontend.send(Request.SET_VRING_NUM, encode_vring_state(0, 64))


def start_with_failing_device(frontend: FakeFrontend, device: FakeDevice) -> None:
    device.fail_start = True
    frontend.negotiate()
    frontend.set_mem_table()
    frontend.setup_ring(0)
    frontend.enable_ring(0)


def ring_past_region_end(frontend: FakeFrontend, device: FakeDevice) -> None:
    # SET_VRING_ADDR before SET_VRING_NUM can only check the start address, so
    # the full length is checked when the ring starts on its kick.
    frontend.negotiate(protocol_features=False)
    frontend.set_mem_table()
    end = GUEST_USER_ADDR + GUEST_SIZE - 0x100
    frontend.send(Request.SET_VRING_ADDR, encode_vring_address(ring_at(frontend, end)))
    frontend.send(Request.SET_VRING_NUM, encode_vring_state(0, QUEUE_SIZE))
    frontend.send(Request.SET_VRING_KICK, encode_u64(0), [frontend.kick[0]])


CASES = [
    Case(
        "payload too short",
        lambda f, d: f.send(Request.SET_FEATURES, bytes(4)),
        "bad-payload-size",
        "SET_FEATURES: payload size 4 is invalid, expected 8 bytes (u64)",
    ),
    Case(
        "payload on GET_FEATURES",
        lambda f, d: f.send(Request.GET_FEATURES, bytes(8)),
        "bad-payload-size",
        "GET_FEATURES: payload size 8 is invalid",
    ),
    Case(
        "unknown request",
        lambda f, d: f.send(99),
        "unknown-request",
        "unknown request code 99",
    ),
    Case(
        "request code zero",
        lambda f, d: f.send(0),
        "unknown-request",
        "unknown request code 0",
    ),
    Case(
        "bad version",
        lambda f, d: f.send(Request.GET_FEATURES, flags=0x2),
        "bad-header",
        "GET_FEATURES: flags 0x2: unsupported version",
    ),
    Case(
        "descriptor on SET_FEATURES",
        lambda f, d: f.send(Request.SET_FEATURES, encode_u64(0), [f.kick[0]]),
        "bad-fd-count",
        "SET_FEATURES: received 1 file descriptors, expected 0",
    ),
    Case(
        "more descriptors than regions",
        lambda f, d: mem_table(f, [f.region], fds=2),
        "bad-fd-count",
        "SET_MEM_TABLE: received 2 file descriptors, expected 1",
    ),
    Case(
        "fewer descriptors than regions",
        lambda f, d: mem_table(
            f, [region(0, 0x1000, 0x7000), region(0x1000, 0x1000, 0x8000)], fds=1
        ),
        "bad-fd-count",
        "SET_MEM_TABLE: received 1 file descriptors, expected 2",
    ),
    Case(
        "overlapping regions",
        lambda f, d: mem_table(
            f, [region(0, 0x2000, 0x7000), region(0x1000, 0x1000, 0x20000)], fds=2
        ),
        "bad-memory-table",
        "overlap in guest address space",
    ),
    Case(
        "zero-size region",
        lambda f, d: mem_table(f, [region(0, 0, 0x7000)], fds=1),
        "bad-memory-table",
        "size 0x0 user address 0x7000: size is zero",
    ),
    Case(
        "more than eight regions",
        lambda f, d: f.send(
            Request.SET_MEM_TABLE, struct.pack("=II", 9, 0) + bytes(8 * 32)
        ),
        "bad-memory-table",
        "SET_MEM_TABLE: nregions 9 exceeds the maximum of 8",
    ),
    Case(
        "region larger than its file",
        lambda f, d: mem_table(f, [region(0, 2 * GUEST_SIZE, 0x7000)], fds=1),
        "bad-memory-table",
        "mmap of fd",
    ),
    Case(
        "ring in no region",
        lambda f, d: ring_setup(f, ring_at(f, 0x1000)),
        "bad-ring-address",
        "SET_VRING_ADDR: queue 0: descriptor table at user address 0x1000 length"
        " 0x1000 is not inside one memory region",
    ),
    Case(
        "misaligned ring",
        lambda f, d: ring_setup(f, ring_at(f, GUEST_USER_ADDR + 0x10008)),
        "bad-ring-address",
        "not aligned to 16 bytes",
    ),
    Case(
        "ring past the end of its region",
        ring_past_region_end,
        "bad-ring-address",
        "SET_VRING_KICK: queue 0: descriptor table at user address 0x7f00001fff00"
        " length 0x1000 is not inside one memory region",
    ),
    Case(
        "dirty log flag",
        lambda f, d: ring_setup(f, ring_at(f, GUEST_USER_ADDR, VRING_F_LOG)),
        "unsupported-request",
        "request dirty page logging",
    ),
    Case(
        "queue index out of range",
        lambda f, d: f.send(Request.SET_VRING_NUM, encode_vring_state(2, 256)),
        "queue-index-out-of-range",
        "SET_VRING_NUM: queue index 2 is out of range, the device has 2 queues",
    ),
    Case(
        "kick for a missing queue",
        lambda f, d: f.send(Request.SET_VRING_KICK, encode_u64(7), [f.kick[0]]),
        "queue-index-out-of-range",
        "SET_VRING_KICK: queue index 7 is out of range",
    ),
    Case(
        "kick with NOFD and a descriptor",
        lambda f, d: f.send(
            Request.SET_VRING_KICK, encode_u64(VRING_NOFD_FLAG), [f.kick[0]]
        ),
        "bad-fd-count",
        "SET_VRING_KICK: received 1 file descriptors, expected 0",
    ),
    Case(
        "queue size not a power of two",
        lambda f, d: f.send(Request.SET_VRING_NUM, encode_vring_state(0, 300)),
        "bad-ring-state",
        "SET_VRING_NUM: queue 0: size 300 is not a power of two",
    ),
    Case(
        "base beyond 16 bits",
        lambda f, d: f.send(Request.SET_VRING_BASE, encode_vring_state(0, 0x10000)),
        "bad-ring-state",
        "base 0x10000 does not fit 16 bits",
    ),
    Case(
        "enable value 2",
        lambda f, d: f.send(Request.SET_VRING_ENABLE, encode_vring_state(0, 2)),
        "bad-ring-state",
        "enable value 2 is not 0 or 1",
    ),
    Case(
        "resize of a running queue",
        start_then_resize,
        "bad-ring-state",
        "SET_VRING_NUM: queue 0: the queue is running",
    ),
    Case(
        "features not offered",
        lambda f, d: f.send(Request.SET_FEATURES, encode_u64(1 << 40)),
        "bad-features",
        "SET_FEATURES: features 0x10000000000 include bits 0x10000000000",
    ),
    Case(
        "protocol features not offered",
        lambda f, d: f.send(
            Request.SET_PROTOCOL_FEATURES, encode_u64(ProtocolFeature.STATUS.mask)
        ),
        "bad-features",
        "SET_PROTOCOL_FEATURES: protocol features 0x10000",
    ),
    Case(
        "log base without LOG_SHMFD",
        lambda f, d: f.send(Request.SET_LOG_BASE, bytes(16), [f.memfd]),
        "unsupported-request",
        "SET_LOG_BASE: request not implemented by this back-end",
    ),
    Case(
        "memory slots not offered",
        lambda f, d: f.send(Request.GET_MAX_MEM_SLOTS),
        "unsupported-request",
        "GET_MAX_MEM_SLOTS: protocol feature CONFIGURE_MEM_SLOTS was not offered",
    ),
    Case(
        "device rejects a queue",
        start_with_failing_device,
        "device-rejected",
        "SET_VRING_ENABLE: device raised: queue 0: start rejected by the test",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_malformed_message_closes_connection(
    case: Case,
    harness: Harness,
    device: FakeDevice,
    caplog: pytest.LogCaptureFixture,
) -> None:
    baseline = open_fds()
    frontend = harness.connect()
    with caplog.at_level(logging.ERROR, logger="device.vhost_user"):
        case.send(frontend, device)
    assert frontend.is_closed()
    assert not harness.server.connected
    assert harness.server.counters[f"error_{case.kind}"] == 1
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert case.text in errors[0].getMessage()
    assert device.running == {}

    device.fail_start = False
    second = harness.connect()
    assert decode_u64(second.call_request(Request.GET_FEATURES))
    for leftover in list(harness.frontends):
        leftover.close()
        harness.frontends.remove(leftover)
    harness.pump()
    assert open_fds() == baseline


def test_failure_reply_before_close(harness: Harness) -> None:
    frontend = harness.connect()
    payload = encode_vring_state(9, 256)
    frontend.send(Request.SET_VRING_NUM, payload, flags=VERSION | FLAG_NEED_REPLY)
    reply = frontend.receive()
    assert reply is not None
    assert decode_u64(reply) != 0
    assert frontend.is_closed()


def test_too_many_descriptors(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    frontend = harness.connect()
    regions = [region(0x1000 * i, 0x1000, 0x10_0000 + 0x1000 * i) for i in range(8)]
    with caplog.at_level(logging.ERROR, logger="device.vhost_user"):
        mem_table(frontend, regions, fds=9)
    assert frontend.is_closed()
    assert "received more than 8 file descriptors" in caplog.text
    assert harness.server.counters["error_bad-fd-count"] == 1


def test_end_of_stream_inside_message(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    frontend = harness.connect()
    data = encode_message(Request.SET_FEATURES, encode_u64(0))
    frontend.sock.sendmsg([data[:12]])
    with caplog.at_level(logging.INFO, logger="device.vhost_user"):
        frontend.sock.close()
        harness.frontends.remove(frontend)
        os.close(frontend.memfd)
        frontend.memory.close()
        for fd in [*frontend.kick.values(), *frontend.call.values()]:
            os.close(fd)
        harness.pump()
    assert "closed the connection inside a message" in caplog.text
    assert harness.server.counters["protocol_errors"] == 0
    assert decode_u64(harness.connect().call_request(Request.GET_FEATURES))
