"""The back-end state of one front-end connection, driven by decoded messages.

``Session.handle`` applies one ``Message`` and returns the reply bytes, if
any. It does no socket I/O, so tests can drive it directly. It does map the
front-end's memory and close descriptors, which the connection owns.

Replies follow the specification's "Communication" section: GET_FEATURES,
GET_PROTOCOL_FEATURES, GET_VRING_BASE, GET_QUEUE_NUM and GET_MAX_MEM_SLOTS
always get one. Any other request gets a u64 0 when it sets NEED_REPLY. A
request that fails raises a ``VhostUserError``, and the server closes the
connection after sending a nonzero u64 if the request asked for a reply.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable
from typing import TypeVar

from virtio.errors import VirtioError

from .adapter import VhostUserDevice
from .errors import (
    DeviceRejectedError,
    FdCountError,
    FeatureNegotiationError,
    QueueIndexError,
    RingAddressError,
    RingStateError,
    UnsupportedRequestError,
)
from .memory_table import MemoryTable
from .protocol import (
    F_PROTOCOL_FEATURES,
    REPLY_LAYOUTS,
    VRING_F_LOG,
    Message,
    ProtocolFeature,
    Request,
    VringAddress,
    decode_memory_region,
    decode_memory_table,
    decode_ring_fd,
    decode_u64,
    decode_vring_address,
    decode_vring_state,
    encode_reply,
    encode_u64,
    encode_vring_state,
)
from .vring import MAX_QUEUE_SIZE, Vring, ring_layouts

__all__ = [
    "ACCESS_PLATFORM",
    "DEFAULT_PROTOCOL_FEATURES",
    "MAX_MEM_SLOTS",
    "RING_PACKED",
    "SUPPORTED_PROTOCOL_FEATURES",
    "Session",
]

logger = logging.getLogger(__name__)

_Result = TypeVar("_Result")

#: VIRTIO_F_ACCESS_PLATFORM. With it, ring addresses are IOVAs that need the
#: IOTLB messages, which this back-end does not implement, so it never offers it.
ACCESS_PLATFORM = 33
#: VIRTIO_F_RING_PACKED. Ring checks and ``start_queue`` are for split rings
#: only, so this bit is never offered either.
RING_PACKED = 34
_NEVER_OFFERED = (1 << ACCESS_PLATFORM) | (1 << RING_PACKED)

#: Protocol features offered by default.
DEFAULT_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ.mask
    | ProtocolFeature.REPLY_ACK.mask
    | ProtocolFeature.RESET_DEVICE.mask
)

# NOTE: CONFIGURE_MEM_SLOTS (ADD_MEM_REG, REM_MEM_REG) is implemented but only
# tested with the fake front-end of the tests, so it is opt-in.
#: Every protocol feature this module implements.
SUPPORTED_PROTOCOL_FEATURES = (
    DEFAULT_PROTOCOL_FEATURES | ProtocolFeature.CONFIGURE_MEM_SLOTS.mask
)

#: GET_MAX_MEM_SLOTS reply. ``GuestMemory.find_region`` scans regions in
#: order, so a small table keeps translation cheap.
MAX_MEM_SLOTS = 32

_ACK_SUCCESS = encode_u64(0)
_ACK_FAILURE = encode_u64(1)


class Session:
    """Protocol state of one connection: features, memory table and rings."""

    def __init__(
        self,
        device: VhostUserDevice,
        fence: Callable[[], None],
        *,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        watch_kick: Callable[[int, int], None] = lambda fd, index: None,
        unwatch_kick: Callable[[int], None] = lambda fd: None,
        counters: collections.Counter[str] | None = None,
    ) -> None:
        unsupported = protocol_features & ~SUPPORTED_PROTOCOL_FEATURES
        if unsupported:
            raise ValueError(
                f"protocol features {unsupported:#x} are not implemented; the"
                f" supported mask is {SUPPORTED_PROTOCOL_FEATURES:#x}"
            )

        self.device = device
        self.offered_protocol_features = protocol_features
        self.protocol_features = 0
        self.features = 0
        self.table = MemoryTable(fence, MAX_MEM_SLOTS)
        self.rings = [Vring(index) for index in range(device.num_queues())]
        self.counters = collections.Counter() if counters is None else counters

        # The server must stop watching a kick fd before the session closes it:
        # epoll keeps reporting a closed fd whose file the front-end still has.
        self._watch_kick = watch_kick
        self._unwatch_kick = unwatch_kick

        self._handlers: dict[Request, Callable[[Message], bytes | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.RESET_DEVICE: self._reset_device,
        }

    # -- entry points -------------------------------------------------------

    def handle(self, message: Message) -> bytes | None:
        """Apply one message; return the reply to send, or None.

        Raises a ``VhostUserError`` subclass when the message is invalid or
        cannot be applied. Descriptors the session keeps are removed from
        ``message.fds``; the caller closes the rest.
        """
        self.counters[message.name] += 1
        handler = self._handlers.get(message.request, self._unsupported)
        payload = handler(message)
        if message.request in REPLY_LAYOUTS:
            assert payload is not None, f"{message.name} handler returned no reply"
            return encode_reply(message.request, payload)
        if message.need_reply:
            return encode_reply(message.request, _ACK_SUCCESS)
        return None

    def failure_reply(self, message: Message) -> bytes | None:
        """Return the reply that reports a failed ``message``, or None.

        Only acknowledgements have a failure value (nonzero). A request with
        its own reply layout gets no reply, so the front-end learns of the failure
        from the closed connection.
        """
        if message.need_reply and message.request not in REPLY_LAYOUTS:
            return encode_reply(message.request, _ACK_FAILURE)
        return None

    def kick(self, index: int, writes: int = 1) -> None:
        """Pass a kick of ring ``index`` to the device.

        ``writes`` is how many notifications the frontend wrote to the kick
        eventfd since it was last read; they are counted per ring as
        ``kick_writes_<index>``, the figure comparable to a VMM's kick count.
        """
        ring = self.rings[index]
        if not ring.started or ring.broken:
            return
        self.counters["kicks"] += 1
        self.counters[f"kick_writes_{index}"] += writes
        try:
            self.device.on_kick(index)
        except VirtioError as error:
            ring.broken = True
            if ring.kick_fd is not None:
                self._unwatch_kick(ring.kick_fd)
            self.counters["broken_queues"] += 1
            logger.error(
                "queue %d: device failed to process a kick, no longer watching its"
                " kicks: %s",
                index,
                error,
            )

    def close(self) -> None:
        """Stop every ring, reset the device, unmap memory and close descriptors."""
        for ring in self.rings:
            if ring.started:
                try:
                    self._stop(ring, "disconnect")
                except DeviceRejectedError as error:
                    logger.error(
                        "queue %d: stop failed at disconnect: %s", ring.index, error
                    )
                    ring.started = False
            ring.close_fds()
        try:
            self.device.reset()
        except VirtioError as error:
            logger.error("device reset failed at disconnect: %s", error)
        self.table.close()

    # -- features -------------------------------------------------------------

    def offered_features(self) -> int:
        """Return the GET_FEATURES value: the device's bits plus bit 30."""
        device_features = self.device.features() & ~_NEVER_OFFERED
        return device_features | (1 << F_PROTOCOL_FEATURES)

    @property
    def protocol_features_negotiated(self) -> bool:
        """True when the front-end acknowledged VHOST_USER_F_PROTOCOL_FEATURES."""
        return bool(self.features & (1 << F_PROTOCOL_FEATURES))

    def _get_features(self, message: Message) -> bytes:
        return encode_u64(self.offered_features())

    def _set_features(self, message: Message) -> None:
        features = decode_u64(message)
        extra = features & ~self.offered_features()
        if extra:
            raise FeatureNegotiationError(
                message.name,
                f"features {features:#x} include bits {extra:#x} that were not offered",
            )
        self.features = features
        self._call_device(
            message.name,
            self.device.set_features,
            features & ~(1 << F_PROTOCOL_FEATURES),
        )

    def _set_owner(self, message: Message) -> None:
        logger.debug("front-end took ownership")

    def _reset_owner(self, message: Message) -> None:
        # The specification deprecates RESET_OWNER and recommends treating it
        # as "disable all rings", not as a reset of the connection state.
        for ring in self.rings:
            ring.enabled = False
            if ring.started:
                self._stop(ring, message.name)

    def _get_protocol_features(self, message: Message) -> bytes:
        return encode_u64(self.offered_protocol_features)

    def _set_protocol_features(self, message: Message) -> None:
        features = decode_u64(message)
        extra = features & ~self.offered_protocol_features
        if extra:
            raise FeatureNegotiationError(
                message.name,
                f"protocol features {features:#x} include bits {extra:#x} that were"
                " not offered",
            )
        self.protocol_features = features

    def _get_queue_num(self, message: Message) -> bytes:
        self._require_offered(message, ProtocolFeature.MQ)
        return encode_u64(self._call_device(message.name, self.device.queue_num))

    def _reset_device(self, message: Message) -> None:
        self._require_offered(message, ProtocolFeature.RESET_DEVICE)
        for ring in self.rings:
            if ring.started:
                self._stop(ring, message.name)
            ring.close_fds()
        self.rings = [Vring(index) for index in range(len(self.rings))]
        self.features = 0
        self._call_device(message.name, self.device.reset)

    # -- memory table ---------------------------------------------------------

    def _set_mem_table(self, message: Message) -> None:
        regions = decode_memory_table(message)
        fds = message.fds[:]
        message.fds.clear()
        mapped = self.table.map_regions(message.name, regions, fds)
        running = self._stop_running(message.name)
        self.table.install(mapped)
        logger.info(
            "memory table set: %s",
            ", ".join(str(region) for region in regions) or "no regions",
        )
        self._restart(message.name, running)

    def _get_max_mem_slots(self, message: Message) -> bytes:
        self._require_offered(message, ProtocolFeature.CONFIGURE_MEM_SLOTS)
        return encode_u64(self.table.max_regions)

    def _add_mem_reg(self, message: Message) -> None:
        self._require_offered(message, ProtocolFeature.CONFIGURE_MEM_SLOTS)
        region = decode_memory_region(message)
        if len(message.fds) != 1:
            raise FdCountError(message.name, len(message.fds), 1)
        mapped = self.table.map_region(message.name, region, message.fds.pop())
        running = self._stop_running(message.name)
        self.table.insert(mapped)
        self._restart(message.name, running)

    def _rem_mem_reg(self, message: Message) -> None:
        self._require_offered(message, ProtocolFeature.CONFIGURE_MEM_SLOTS)
        region = decode_memory_region(message)
        # The specification lets a front-end pass one descriptor here, which the
        # back-end must close unused; the server closes what is left in fds.
        if len(message.fds) > 1:
            raise FdCountError(message.name, len(message.fds), 1)
        running = self._stop_running(message.name)
        self.table.remove(message.name, region)
        self._restart(message.name, running)

    # -- rings ----------------------------------------------------------------

    def _ring(self, request: str, index: int) -> Vring:
        if index >= len(self.rings):
            raise QueueIndexError(request, index, len(self.rings))
        return self.rings[index]

    def _set_vring_num(self, message: Message) -> None:
        state = decode_vring_state(message)
        ring = self._ring(message.name, state.index)
        if ring.started:
            raise RingStateError(message.name, ring.index, "the queue is running")
        size = state.num
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise RingStateError(
                message.name,
                ring.index,
                f"size {size} is not a power of two between 1 and {MAX_QUEUE_SIZE}",
            )
        ring.size = size

    def _set_vring_addr(self, message: Message) -> None:
        address = decode_vring_address(message)
        ring = self._ring(message.name, address.index)
        if address.flags & VRING_F_LOG:
            raise UnsupportedRequestError(
                message.name,
                f"queue {ring.index}: flags {address.flags:#x} request dirty page"
                " logging, which this back-end does not implement",
            )
        if address.flags & ~VRING_F_LOG:
            raise RingStateError(
                message.name, ring.index, f"flags {address.flags:#x} has unknown bits"
            )
        if self.table.regions:
            self._translate(message.name, ring.index, address, ring.size or 0)
        was_started = ring.started
        if was_started:
            self._stop(ring, message.name)
        ring.address = address
        if was_started:
            self._try_start(message.name, ring)

    def _set_vring_base(self, message: Message) -> None:
        state = decode_vring_state(message)
        ring = self._ring(message.name, state.index)
        if ring.started:
            raise RingStateError(message.name, ring.index, "the queue is running")
        if state.num > 0xFFFF:
            raise RingStateError(
                message.name, ring.index, f"base {state.num:#x} does not fit 16 bits"
            )
        ring.base = state.num

    def _get_vring_base(self, message: Message) -> bytes:
        state = decode_vring_state(message)
        ring = self._ring(message.name, state.index)
        if ring.started:
            self._stop(ring, message.name)
        # A stopped ring starts again only on a new SET_VRING_KICK. The call
        # descriptor stays, for a front-end that does not send it again.
        ring.kicked = False
        ring.replace_kick_fd(None)
        return encode_vring_state(ring.index, ring.base)

    def _set_vring_kick(self, message: Message) -> None:
        index, fd = decode_ring_fd(message)
        ring = self._ring_owning_fd(message.name, index, fd)
        if ring.started:
            self._stop(ring, message.name)
        ring.replace_kick_fd(fd)
        ring.kicked = True
        ring.broken = False
        self._try_start(message.name, ring)

    def _set_vring_call(self, message: Message) -> None:
        index, fd = decode_ring_fd(message)
        ring = self._ring_owning_fd(message.name, index, fd)
        old = ring.replace_call_fd(fd)
        try:
            if ring.started:
                self._call_device(message.name, self.device.set_call_fd, index, fd)
        finally:
            self._close_fd(old)

    def _set_vring_err(self, message: Message) -> None:
        index, fd = decode_ring_fd(message)
        ring = self._ring_owning_fd(message.name, index, fd)
        ring.replace_err_fd(fd)

    def _set_vring_enable(self, message: Message) -> None:
        state = decode_vring_state(message)
        ring = self._ring(message.name, state.index)
        if state.num not in (0, 1):
            raise RingStateError(
                message.name, ring.index, f"enable value {state.num} is not 0 or 1"
            )
        ring.enabled = bool(state.num)
        if ring.enabled:
            self._try_start(message.name, ring)
        elif ring.started:
            # NOTE: the specification has disabled rings keep running without
            # side effects; this back-end stops them instead, so a disabled TX
            # ring is not drained.
            self._stop(ring, message.name)

    def _ring_owning_fd(self, request: str, index: int, fd: int | None) -> Vring:
        try:
            return self._ring(request, index)
        except QueueIndexError:
            self._close_fd(fd)
            raise

    def _translate(
        self, request: str, index: int, address: VringAddress, size: int
    ) -> tuple[int, int, int]:
        """Return the guest addresses of the descriptor table, avail and used rings.

        A ``size`` of 0 checks only that each start address is mapped, which is
        all SET_VRING_ADDR can check before SET_VRING_NUM.
        """
        guest_addresses = []
        for layout in ring_layouts(address, size):
            length = layout.length if size else 1
            if layout.user_addr % layout.alignment:
                raise RingAddressError(
                    request,
                    index,
                    f"{layout.name} at user address {layout.user_addr:#x} is not"
                    f" aligned to {layout.alignment} bytes",
                )
            gpa = self.table.user_to_guest(layout.user_addr, length)
            if gpa is None:
                raise RingAddressError(
                    request,
                    index,
                    f"{layout.name} at user address {layout.user_addr:#x} length"
                    f" {length:#x} is not inside one memory region",
                )
            guest_addresses.append(gpa)
        desc_gpa, avail_gpa, used_gpa = guest_addresses
        return desc_gpa, avail_gpa, used_gpa

    def _try_start(self, request: str, ring: Vring) -> None:
        """Start ``ring`` if it is set up, kicked, enabled and memory is mapped.

        Without VHOST_USER_F_PROTOCOL_FEATURES a ring counts as enabled, as
        the specification's "Ring states" section requires.
        """
        enabled = ring.enabled or not self.protocol_features_negotiated
        memory = self.table.memory
        if (
            ring.started
            or not ring.kicked
            or not enabled
            or ring.size is None
            or ring.address is None
            or memory is None
        ):
            return
        desc_gpa, avail_gpa, used_gpa = self._translate(
            request, ring.index, ring.address, ring.size
        )
        self._call_device(
            request,
            self.device.start_queue,
            ring.index,
            memory,
            ring.size,
            desc_gpa,
            avail_gpa,
            used_gpa,
            ring.base,
            ring.kick_fd,
            ring.call_fd,
        )
        ring.started = True
        if ring.kick_fd is not None:
            self._watch_kick(ring.kick_fd, ring.index)
        self.counters["queue_starts"] += 1
        logger.info(
            "queue %d started: size %d, desc %#x, avail %#x, used %#x, base %d",
            ring.index,
            ring.size,
            desc_gpa,
            avail_gpa,
            used_gpa,
            ring.base,
        )

    def _stop(self, ring: Vring, reason: str) -> None:
        ring.started = False
        if ring.kick_fd is not None and not ring.broken:
            self._unwatch_kick(ring.kick_fd)
        next_avail = self._call_device(reason, self.device.stop_queue, ring.index)
        if not 0 <= next_avail <= 0xFFFF:
            raise DeviceRejectedError(
                reason,
                f"queue {ring.index}: stop_queue returned {next_avail!r}, not a"
                " 16-bit index",
            )
        ring.base = next_avail
        self.counters["queue_stops"] += 1
        logger.info(
            "queue %d stopped (%s) at avail index %d", ring.index, reason, next_avail
        )

    def _stop_running(self, request: str) -> list[Vring]:
        running = [ring for ring in self.rings if ring.started]
        for ring in running:
            self._stop(ring, request)
        return running

    def _restart(self, request: str, rings: list[Vring]) -> None:
        for ring in rings:
            self._try_start(request, ring)

    # -- helpers --------------------------------------------------------------

    def _require_offered(self, message: Message, feature: ProtocolFeature) -> None:
        if not self.offered_protocol_features & feature.mask:
            raise UnsupportedRequestError(
                message.name, f"protocol feature {feature.name} was not offered"
            )

    def _unsupported(self, message: Message) -> None:
        raise UnsupportedRequestError(
            message.name, "request not implemented by this back-end"
        )

    def _call_device(
        self, request: str, method: Callable[..., _Result], *args: object
    ) -> _Result:
        try:
            return method(*args)
        except VirtioError as error:
            raise DeviceRejectedError(request, f"device raised: {error}") from error

    @staticmethod
    def _close_fd(fd: int | None) -> None:
        if fd is not None:
            os.close(fd)
