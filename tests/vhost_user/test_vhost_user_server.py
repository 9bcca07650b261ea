"""Tests of the vhost-user server with a fake front-end over a real socket."""

from __future__ import annotations

import logging
import os
import socket
import struct
from pathlib import Path

import pytest
from vhost_user_fakes import (
    DEVICE_FEATURES,
    F_PROTOCOL_FEATURES,
    GUEST_SIZE,
    GUEST_USER_ADDR,
    QUEUE_SIZE,
    FakeDevice,
    FakeFrontend,
    Harness,
    open_fds,
)

from device.vhost_user import VhostUserServer
from device.vhost_user.fence import load_full_fence
from device.vhost_user.protocol import (
    VERSION,
    VRING_NOFD_FLAG,
    ProtocolFeature,
    Request,
    VhostMemoryRegion,
    decode_u64,
    decode_vring_state,
    encode_memory_region,
    encode_memory_table,
    encode_message,
    encode_u64,
    encode_vring_address,
    encode_vring_state,
)
from device.vhost_user.session import (
    DEFAULT_PROTOCOL_FEATURES,
    MAX_MEM_SLOTS,
    SUPPORTED_PROTOCOL_FEATURES,
    Session,
)

RING0_DESC_GPA = 0x1_0000


def write_avail_idx(frontend: FakeFrontend, index: int, value: int) -> None:
    """Store avail.idx of ring ``index`` in guest memory, as a driver would."""
    avail = frontend.ring_address(index).avail_user_addr - GUEST_USER_ADDR
    struct.pack_into("=H", frontend.memory, avail + 2, value)


def get_vring_base(frontend: FakeFrontend, index: int) -> int:
    reply = frontend.call_request(Request.GET_VRING_BASE, encode_vring_state(index, 0))
    state = decode_vring_state(reply)
    assert state.index == index
    return state.num


# -- features and start-up --------------------------------------------------------


def test_get_features_adds_protocol_bit(harness: Harness) -> None:
    frontend = harness.connect()
    features = decode_u64(frontend.call_request(Request.GET_FEATURES))
    assert features == DEVICE_FEATURES | F_PROTOCOL_FEATURES


def test_get_features_hides_unimplemented_bits(tmp_path: Path) -> None:
    device = FakeDevice(offered=DEVICE_FEATURES | (1 << 33) | (1 << 34))
    harness = Harness(tmp_path / "sock", device)
    try:
        features = decode_u64(harness.connect().call_request(Request.GET_FEATURES))
    finally:
        harness.close()
    assert features == DEVICE_FEATURES | F_PROTOCOL_FEATURES


def test_protocol_features_offered(harness: Harness) -> None:
    frontend = harness.connect()
    offered = decode_u64(frontend.call_request(Request.GET_PROTOCOL_FEATURES))
    assert offered == DEFAULT_PROTOCOL_FEATURES
    assert offered & ProtocolFeature.REPLY_ACK.mask
    assert offered & ProtocolFeature.MQ.mask


def test_set_features_reaches_device(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    acked = frontend.negotiate()
    assert device.acked == acked & ~F_PROTOCOL_FEATURES


def test_get_queue_num(harness: Harness) -> None:
    frontend = harness.connect()
    assert decode_u64(frontend.call_request(Request.GET_QUEUE_NUM)) == 1


def test_qemu_sequence_starts_rings(harness: Harness, device: FakeDevice) -> None:
    # The order QEMU 7.2 uses: CALL, ERR and ENABLE arrive at device
    # initialisation, before the features and the memory table.
    frontend = harness.connect()
    decode_u64(frontend.call_request(Request.GET_FEATURES))
    offered = decode_u64(frontend.call_request(Request.GET_PROTOCOL_FEATURES))
    frontend.send(Request.SET_PROTOCOL_FEATURES, encode_u64(offered))
    frontend.call_request(Request.GET_QUEUE_NUM)
    frontend.send(Request.SET_OWNER)
    decode_u64(frontend.call_request(Request.GET_FEATURES))
    error_fds = [os.eventfd(0), os.eventfd(0)]
    for index in (0, 1):
        frontend.send(Request.SET_VRING_CALL, encode_u64(index), [frontend.call[index]])
        frontend.send(Request.SET_VRING_ERR, encode_u64(index), [error_fds[index]])
    for index in (0, 1):
        frontend.enable_ring(index)
    for fd in error_fds:
        os.close(fd)
    assert device.starts == []

    frontend.send(
        Request.SET_FEATURES, encode_u64(DEVICE_FEATURES | F_PROTOCOL_FEATURES)
    )
    assert frontend.set_mem_table() == 0
    for index in (0, 1):
        frontend.setup_ring(index)

    assert [start.index for start in device.starts] == [0, 1]
    first = device.starts[0]
    assert first.size == QUEUE_SIZE
    assert first.desc_gpa == RING0_DESC_GPA
    assert first.avail_gpa == RING0_DESC_GPA + 0x1000
    assert first.used_gpa == RING0_DESC_GPA + 0x2000
    assert first.last_avail_idx == 0
    assert first.kick_fd is not None
    assert first.memory.size == GUEST_SIZE


def test_dpdk_sequence_starts_on_enable(harness: Harness, device: FakeDevice) -> None:
    # The order dpdk-testpmd 22.11 (net_virtio_user) uses.
    frontend = harness.connect()
    frontend.send(Request.SET_OWNER)
    features = decode_u64(frontend.call_request(Request.GET_FEATURES))
    frontend.call_request(Request.GET_PROTOCOL_FEATURES)
    requested = ProtocolFeature.MQ.mask | ProtocolFeature.REPLY_ACK.mask
    frontend.send(Request.SET_PROTOCOL_FEATURES, encode_u64(requested))
    for index in (0, 1):
        frontend.send(Request.SET_VRING_CALL, encode_u64(index), [frontend.call[index]])
    frontend.send(Request.SET_FEATURES, encode_u64(features))
    assert frontend.set_mem_table() == 0
    for index in (0, 1):
        frontend.send(Request.SET_VRING_NUM, encode_vring_state(index, QUEUE_SIZE))
        frontend.send(Request.SET_VRING_BASE, encode_vring_state(index, 0))
        address = encode_vring_address(frontend.ring_address(index))
        frontend.send(Request.SET_VRING_ADDR, address)
        frontend.send(Request.SET_VRING_KICK, encode_u64(index), [frontend.kick[index]])
    assert device.starts == []

    frontend.enable_ring(0)
    frontend.enable_ring(1)
    assert sorted(device.running) == [0, 1]

    frontend.enable_ring(0, False)
    frontend.enable_ring(1, False)
    assert device.running == {}
    assert get_vring_base(frontend, 0) == 0
    assert get_vring_base(frontend, 1) == 0


def test_ring_waits_for_enable(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    frontend.negotiate()
    frontend.set_mem_table()
    frontend.setup_ring(0)
    assert device.starts == []
    frontend.enable_ring(0)
    assert [start.index for start in device.starts] == [0]


def test_legacy_ring_starts_on_kick(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    frontend.negotiate(protocol_features=False)
    frontend.set_mem_table()
    frontend.send(Request.SET_VRING_NUM, encode_vring_state(0, QUEUE_SIZE))
    frontend.send(
        Request.SET_VRING_ADDR, encode_vring_address(frontend.ring_address(0))
    )
    assert device.starts == []
    frontend.send(Request.SET_VRING_KICK, encode_u64(0), [frontend.kick[0]])
    assert [start.index for start in device.starts] == [0]
    assert device.starts[0].call_fd is None


def test_enable_before_mem_table(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    frontend.negotiate()
    frontend.enable_ring(0)
    frontend.enable_ring(1)
    assert harness.server.connected
    frontend.set_mem_table()
    frontend.setup_ring(0)
    assert [start.index for start in device.starts] == [0]


def test_polling_ring_has_no_kick_fd(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    frontend.negotiate()
    frontend.set_mem_table()
    frontend.send(Request.SET_VRING_NUM, encode_vring_state(0, QUEUE_SIZE))
    frontend.send(
        Request.SET_VRING_ADDR, encode_vring_address(frontend.ring_address(0))
    )
    frontend.send(Request.SET_VRING_KICK, encode_u64(VRING_NOFD_FLAG))
    frontend.enable_ring(0)
    assert device.starts[0].kick_fd is None


def test_need_reply_acks_plain_request(harness: Harness) -> None:
    frontend = harness.connect()
    frontend.negotiate()
    assert frontend.ack_request(Request.SET_VRING_NUM, encode_vring_state(0, 64)) == 0


# -- kicks, calls and the shared memory --------------------------------------------


def test_kick_reaches_device(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    frontend.start()
    write_avail_idx(frontend, 0, 5)
    os.eventfd_write(frontend.kick[0], 1)
    frontend.pump()
    assert device.kicks == [0]
    # The fake device read avail.idx through the server's mapping and signalled
    # the call eventfd.
    assert os.eventfd_read(frontend.call[0]) == 1
    assert get_vring_base(frontend, 0) == 5


def test_device_writes_reach_frontend(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    frontend.start()
    start = device.running[0]
    start.memory.write(start.used_gpa, b"\x01\x00\x07\x00")
    used = frontend.ring_address(0).used_user_addr - GUEST_USER_ADDR
    assert frontend.memory[used : used + 4] == b"\x01\x00\x07\x00"


def test_get_vring_base_stops_ring(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    frontend.start()
    device.next_avail[1] = 17
    assert get_vring_base(frontend, 1) == 17
    assert 1 not in device.running
    # A stopped ring needs a new kick before it starts again.
    frontend.enable_ring(1)
    assert 1 not in device.running
    frontend.send(Request.SET_VRING_KICK, encode_u64(1), [frontend.kick[1]])
    assert device.running[1].last_avail_idx == 17


def test_kick_and_stop_in_one_round(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    frontend.start()
    for _ in range(20):
        # Both events are ready in the same poll, the message first (epoll
        # reports in readiness order). The kick of the ring that the message
        # stopped must then be skipped.
        frontend.sock.sendmsg(
            [encode_message(Request.GET_VRING_BASE, encode_vring_state(0, 0))]
        )
        os.eventfd_write(frontend.kick[0], 1)
        harness.pump()
        assert frontend.receive() is not None
        frontend.send(Request.SET_VRING_KICK, encode_u64(0), [frontend.kick[0]])
        assert 0 in device.running


def test_get_vring_base_of_stopped_ring(harness: Harness) -> None:
    frontend = harness.connect()
    frontend.negotiate()
    frontend.send(Request.SET_VRING_BASE, encode_vring_state(1, 9))
    assert get_vring_base(frontend, 1) == 9


def test_disable_and_enable_keep_position(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    frontend.start()
    device.next_avail[0] = 40
    frontend.enable_ring(0, False)
    assert 0 not in device.running
    frontend.enable_ring(0)
    assert device.running[0].last_avail_idx == 40


def test_set_vring_call_while_running(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    frontend.start()
    old_call_fd = device.running[0].call_fd
    before = open_fds()
    replacement = os.eventfd(0, os.EFD_NONBLOCK)
    frontend.send(Request.SET_VRING_CALL, encode_u64(0), [replacement])
    assert len(device.call_fds) == 1
    index, call_fd = device.call_fds[0]
    assert index == 0
    assert call_fd is not None
    os.eventfd_write(call_fd, 1)
    assert os.eventfd_read(replacement) == 1
    os.close(replacement)
    # The server closed the old call descriptor after the switch.
    after = open_fds()
    assert old_call_fd not in after
    assert len(after) == len(before)


def test_kick_replaced_while_running(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    frontend.start()
    replacement = os.eventfd(0)
    frontend.send(Request.SET_VRING_KICK, encode_u64(0), [replacement])
    assert device.stops == [0]
    assert 0 in device.running
    os.eventfd_write(replacement, 1)
    frontend.pump()
    assert device.kicks == [0]
    os.close(replacement)


def test_set_vring_addr_while_running(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    frontend.start()
    moved = frontend.ring_address(0, offset=0x8000)
    frontend.send(Request.SET_VRING_ADDR, encode_vring_address(moved))
    assert device.stops == [0]
    assert device.running[0].desc_gpa == RING0_DESC_GPA + 0x8000


def test_kick_error_breaks_queue_only(
    harness: Harness, device: FakeDevice, caplog: pytest.LogCaptureFixture
) -> None:
    frontend = harness.connect()
    frontend.start()
    device.fail_kick = True
    os.eventfd_write(frontend.kick[0], 1)
    with caplog.at_level(logging.ERROR, logger="device.vhost_user"):
        frontend.pump()
    assert "queue 0: device failed to process a kick" in caplog.text
    assert harness.server.counters["broken_queues"] == 1
    device.fail_kick = False
    os.eventfd_write(frontend.kick[0], 1)
    frontend.pump()
    assert device.kicks == []
    assert harness.server.connected
    assert decode_u64(frontend.call_request(Request.GET_FEATURES))


# -- memory table changes ---------------------------------------------------------


def test_mem_table_replaced_while_running(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    frontend.start()
    old_memory = device.running[0].memory
    device.next_avail[0] = 3
    assert frontend.set_mem_table() == 0
    assert sorted(device.stops) == [0, 1]
    assert device.running[0].memory is not old_memory
    assert device.running[0].last_avail_idx == 3
    # The old regions were unmapped, so their views are released.
    with pytest.raises(ValueError, match="released"):
        old_memory.read(0, 1)


def test_mem_table_with_offset_mapping(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    frontend.negotiate()
    # Map the second half of the memfd at an offset that is not page aligned.
    offset = GUEST_SIZE // 2 + 0x100
    region = VhostMemoryRegion(0x4000_0000, 0x1_0000, 0x6000_0000, offset)
    payload = encode_memory_table([region])
    assert frontend.ack_request(Request.SET_MEM_TABLE, payload, [frontend.memfd]) == 0
    frontend.memory[offset : offset + 4] = b"ring"
    session = harness.server.session
    assert session is not None
    assert session.table.memory is not None
    assert session.table.memory.read(0x4000_0000, 4) == b"ring"


def test_add_and_remove_mem_reg(tmp_path: Path, device: FakeDevice) -> None:
    harness = Harness(
        tmp_path / "sock", device, protocol_features=SUPPORTED_PROTOCOL_FEATURES
    )
    try:
        frontend = harness.connect()
        offered = decode_u64(frontend.call_request(Request.GET_PROTOCOL_FEATURES))
        assert offered & ProtocolFeature.CONFIGURE_MEM_SLOTS.mask
        frontend.send(Request.SET_PROTOCOL_FEATURES, encode_u64(offered))
        slots = decode_u64(frontend.call_request(Request.GET_MAX_MEM_SLOTS))
        assert slots == MAX_MEM_SLOTS
        frontend.send(
            Request.SET_FEATURES, encode_u64(DEVICE_FEATURES | F_PROTOCOL_FEATURES)
        )
        low = VhostMemoryRegion(0, GUEST_SIZE // 2, GUEST_USER_ADDR, 0)
        high = VhostMemoryRegion(
            GUEST_SIZE // 2,
            GUEST_SIZE // 2,
            GUEST_USER_ADDR + GUEST_SIZE // 2,
            GUEST_SIZE // 2,
        )
        for region in (low, high):
            payload = encode_memory_region(region)
            assert (
                frontend.ack_request(Request.ADD_MEM_REG, payload, [frontend.memfd])
                == 0
            )
        frontend.setup_ring(0)
        frontend.enable_ring(0)
        assert len(device.starts) == 1
        assert len(device.starts[0].memory.regions) == 2

        payload = encode_memory_region(high)
        assert frontend.ack_request(Request.REM_MEM_REG, payload) == 0
        assert len(device.running[0].memory.regions) == 1
        assert device.stops == [0]
    finally:
        harness.close()


# -- resets and disconnects --------------------------------------------------------


def test_reset_device(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    frontend.start()
    frontend.send(Request.RESET_DEVICE)
    assert device.running == {}
    assert device.resets == 1
    assert device.acked is None
    # The rings forgot their set-up: an enable alone starts nothing.
    frontend.enable_ring(0)
    assert device.running == {}


def test_reset_owner_disables_rings(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    frontend.start()
    frontend.send(Request.RESET_OWNER)
    assert device.running == {}
    assert harness.server.connected


def test_disconnect_cleans_up(harness: Harness, device: FakeDevice) -> None:
    baseline = open_fds()
    frontend = harness.connect()
    frontend.start()
    frontend.close()
    harness.frontends.remove(frontend)
    harness.pump()
    assert not harness.server.connected
    assert sorted(device.stops) == [0, 1]
    assert device.resets == 1
    assert harness.server.counters["disconnects"] == 1
    assert open_fds() == baseline
    second = harness.connect()
    assert decode_u64(second.call_request(Request.GET_FEATURES))


def test_disconnect_with_view_kept(
    harness: Harness, device: FakeDevice, caplog: pytest.LogCaptureFixture
) -> None:
    frontend = harness.connect()
    frontend.start()
    device_view = device.running[0].memory.view(0, 16)
    with caplog.at_level(logging.WARNING, logger="device.vhost_user"):
        frontend.sock.close()
        harness.pump()
    assert not harness.server.connected
    assert "still referenced by a memoryview" in caplog.text
    device_view.release()


def test_connection_reset_cleans_up(harness: Harness, device: FakeDevice) -> None:
    frontend = harness.connect()
    frontend.start()
    # Leave a reply unread, so closing the socket resets the connection.
    frontend.sock.sendmsg([encode_message(Request.GET_FEATURES)])
    harness.pump()
    frontend.sock.close()
    harness.pump()
    assert not harness.server.connected
    assert sorted(device.stops) == [0, 1]


def test_second_frontend_waits(harness: Harness) -> None:
    first = harness.connect()
    second = harness.connect()
    second.sock.sendmsg([encode_message(Request.GET_FEATURES)])
    harness.pump()
    second.sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        second.sock.recv(1)
    first.sock.close()
    harness.pump()
    assert decode_u64(second.receive())  # type: ignore[arg-type]


def test_partial_message_is_buffered(harness: Harness) -> None:
    frontend = harness.connect()
    data = encode_message(Request.SET_FEATURES, encode_u64(DEVICE_FEATURES))
    frontend.sock.sendmsg([data[:5]])
    harness.pump()
    frontend.sock.sendmsg([data[5:14]])
    harness.pump()
    frontend.sock.sendmsg([data[14:]])
    harness.pump()
    assert harness.device.acked == DEVICE_FEATURES
    assert harness.server.connected


def test_frontend_not_reading_replies(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("device.vhost_user.server.SEND_TIMEOUT", 0.05)
    frontend = harness.connect()
    frontend.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = encode_message(Request.GET_FEATURES)
    with caplog.at_level(logging.INFO, logger="device.vhost_user"):
        for _ in range(200):
            frontend.sock.sendall(request * 100)
            harness.pump()
            if not harness.server.connected:
                break
    assert not harness.server.connected
    assert "sending the GET_FEATURES reply failed" in caplog.text


# -- server edges -----------------------------------------------------------------


def test_attach_socketpair(device: FakeDevice) -> None:
    server = VhostUserServer(None, device)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.attach(theirs)
        ours.sendmsg([encode_message(Request.GET_FEATURES)])
        server.poll(1.0)
        reply = ours.recv(64)
        assert reply[:12] == struct.pack("=III", Request.GET_FEATURES, VERSION | 4, 8)
        with pytest.raises(RuntimeError, match="already connected"):
            server.attach(theirs)
    finally:
        ours.close()
        server.close()


def test_add_reader_callback(harness: Harness) -> None:
    read_end, write_end = os.pipe()
    calls = []
    harness.server.add_reader(read_end, lambda: calls.append(os.read(read_end, 8)))
    os.write(write_end, b"x")
    harness.pump()
    harness.server.remove_reader(read_end)
    os.close(read_end)
    os.close(write_end)
    assert calls == [b"x"]


def test_fileno_is_readable_on_connect(harness: Harness) -> None:
    import select

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.fspath(harness.path))
    readable, _, _ = select.select([harness.server.fileno()], [], [], 1.0)
    sock.close()
    assert readable == [harness.server.fileno()]


def test_existing_file_is_not_replaced(tmp_path: Path, device: FakeDevice) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("keep")
    with pytest.raises(FileExistsError, match="is not a socket"):
        VhostUserServer(path, device)
    assert path.read_text() == "keep"


def test_stale_socket_is_replaced(tmp_path: Path, device: FakeDevice) -> None:
    path = tmp_path / "sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(path))
    stale.close()
    with VhostUserServer(path, device) as server:
        assert server.path == os.fspath(path)
    assert not path.exists()


def test_session_rejects_unimplemented_protocol_features(device: FakeDevice) -> None:
    with pytest.raises(ValueError, match="not implemented"):
        Session(device, lambda: None, protocol_features=ProtocolFeature.STATUS.mask)


def test_server_rejects_unimplemented_protocol_features(
    tmp_path: Path, device: FakeDevice
) -> None:
    with pytest.raises(ValueError, match=r"protocol features 0x10000 are not"):
        VhostUserServer(
            tmp_path / "sock", device, protocol_features=ProtocolFeature.STATUS.mask
        )
    assert not (tmp_path / "sock").exists()


def test_full_fence_runs() -> None:
    fence = load_full_fence()
    fence()


def test_fence_missing_library() -> None:
    with pytest.raises(OSError, match="install the libatomic1 package"):
        load_full_fence("libdoes-not-exist.so.0")
