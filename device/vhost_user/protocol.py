"""The vhost-user message codec, without any I/O.

Message format (QEMU docs/interop/vhost-user.rst, "Message Specification"):
a 12-byte header of three u32 fields ``request``, ``flags`` and ``size``,
followed by ``size`` bytes of payload. Flags bits 0-1 are the version (1),
bit 2 marks a reply and bit 3 (NEED_REPLY) requests an acknowledgement when
the REPLY_ACK protocol feature is in use. All numbers are in the host's byte
order. File descriptors travel as SCM_RIGHTS ancillary data of the message.

``C_DECLARATIONS`` states the payload layouts once, in C, for cffi. A test
checks that the ``struct`` formats used to decode each message have the same
sizes and field offsets. ``MessageReader`` frames a byte stream into
``Message`` objects and rejects a bad header before its payload is read.
"""

from __future__ import annotations

import enum
import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import cffi

from .errors import (
    FdCountError,
    HeaderError,
    MemoryTableError,
    PayloadSizeError,
    UnknownRequestError,
)

__all__ = [
    "C_DECLARATIONS",
    "FD_REQUESTS",
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "FLAG_VERSION_MASK",
    "F_PROTOCOL_FEATURES",
    "HEADER_SIZE",
    "LAYOUT_FORMATS",
    "MAX_CONFIG_SIZE",
    "MAX_FDS_PER_MESSAGE",
    "MAX_MEMORY_REGIONS",
    "REPLY_LAYOUTS",
    "REQUEST_LAYOUTS",
    "VERSION",
    "VRING_F_LOG",
    "VRING_INDEX_MASK",
    "VRING_NOFD_FLAG",
    "ConfigSpace",
    "Message",
    "MessageReader",
    "PayloadLayout",
    "ProtocolFeature",
    "Request",
    "VhostMemoryRegion",
    "VringAddress",
    "VringState",
    "check_regions",
    "decode_config",
    "decode_memory_region",
    "decode_memory_table",
    "decode_ring_fd",
    "decode_u64",
    "decode_vring_address",
    "decode_vring_state",
    "encode_config",
    "encode_memory_region",
    "encode_memory_table",
    "encode_message",
    "encode_reply",
    "encode_u64",
    "encode_vring_address",
    "encode_vring_state",
    "ffi",
    "request_name",
]

VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
HEADER_SIZE = 12

#: Regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS in QEMU).
MAX_MEMORY_REGIONS = 8
#: File descriptors one message may carry: SET_MEM_TABLE sends one a region.
MAX_FDS_PER_MESSAGE = MAX_MEMORY_REGIONS
#: Largest GET_CONFIG/SET_CONFIG payload (VHOST_USER_MAX_CONFIG_SIZE).
MAX_CONFIG_SIZE = 256
#: Upper bound for payloads whose layout this module does not decode (crypto
#: sessions). It only bounds the read before the request is rejected.
MAX_OPAQUE_SIZE = 4096

#: Virtio feature bit 30, reused by vhost-user to announce protocol features.
F_PROTOCOL_FEATURES = 30

#: SET_VRING_KICK/CALL/ERR payload: bits 0-7 are the ring index, bit 8 means
#: that no file descriptor is attached.
VRING_INDEX_MASK = 0xFF
VRING_NOFD_FLAG = 0x100

#: SET_VRING_ADDR flags bit 0: log writes to the used ring (live migration).
VRING_F_LOG = 0x1


C_DECLARATIONS = """
struct vhost_user_header {
    uint32_t request;
    uint32_t flags;
    uint32_t size;
};
struct vhost_vring_state {
    uint32_t index;
    uint32_t num;
};
struct vhost_vring_addr {
    uint32_t index;
    uint32_t flags;
    uint64_t desc_user_addr;
    uint64_t used_user_addr;
    uint64_t avail_user_addr;
    uint64_t log_guest_addr;
};
struct vhost_user_memory_region {
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t mmap_offset;
};
struct vhost_user_memory {
    uint32_t nregions;
    uint32_t padding;
    struct vhost_user_memory_region regions[8];
};
struct vhost_user_mem_reg {
    uint64_t padding;
    struct vhost_user_memory_region region;
};
struct vhost_user_log {
    uint64_t mmap_size;
    uint64_t mmap_offset;
};
struct vhost_user_config {
    uint32_t offset;
    uint32_t size;
    uint32_t flags;
    uint8_t region[256];
};
struct vhost_user_inflight {
    uint64_t mmap_size;
    uint64_t mmap_offset;
    uint16_t num_queues;
    uint16_t queue_size;
};
struct vhost_iotlb_msg {
    uint64_t iova;
    uint64_t size;
    uint64_t uaddr;
    uint8_t perm;
    uint8_t type;
};
struct vhost_user_transfer_device_state {
    uint32_t direction;
    uint32_t phase;
};
struct vhost_user_shared {
    unsigned char uuid[16];
};
"""

#: The payload layouts as cffi types. Only tests use it, to check the
#: ``struct`` formats below against the C declarations.
ffi = cffi.FFI()
ffi.cdef(C_DECLARATIONS)

# "=" is native byte order with standard sizes and no implicit padding, so
# trailing padding of the C structs is written out with "x".
_HEADER = struct.Struct("=III")
_U64 = struct.Struct("=Q")
_VRING_STATE = struct.Struct("=II")
_VRING_ADDRESS = struct.Struct("=IIQQQQ")
_MEMORY_REGION = struct.Struct("=QQQQ")
_MEMORY_TABLE_HEADER = struct.Struct("=II")
_MEMORY_REGION_MESSAGE = struct.Struct("=Q" + "QQQQ")
_LOG = struct.Struct("=QQ")
_CONFIG_HEADER = struct.Struct("=III")
_INFLIGHT = struct.Struct("=QQHH4x")
_IOTLB = struct.Struct("=QQQBB6x")
_DEVICE_STATE = struct.Struct("=II")
_SHARED_OBJECT = struct.Struct("=16s")

#: The ``struct`` format of each C declaration, by C type name. Fields are in
#: declaration order, so a test can pack values and read them back with cffi.
LAYOUT_FORMATS: dict[str, struct.Struct] = {
    "struct vhost_user_header": _HEADER,
    "struct vhost_vring_state": _VRING_STATE,
    "struct vhost_vring_addr": _VRING_ADDRESS,
    "struct vhost_user_memory_region": _MEMORY_REGION,
    "struct vhost_user_mem_reg": _MEMORY_REGION_MESSAGE,
    "struct vhost_user_log": _LOG,
    "struct vhost_user_inflight": _INFLIGHT,
    "struct vhost_iotlb_msg": _IOTLB,
    "struct vhost_user_transfer_device_state": _DEVICE_STATE,
    "struct vhost_user_shared": _SHARED_OBJECT,
}


class Request(enum.IntEnum):
    """Front-end request codes, named as in the specification."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of the protocol features (GET_PROTOCOL_FEATURES)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19

    @property
    def mask(self) -> int:
        """The feature as a bit mask."""
        return 1 << self.value


class PayloadLayout(enum.Enum):
    """Payload formats of the specification's "Payload" section."""

    NONE = "none"
    U64 = "u64"
    VRING_STATE = "vring state"
    VRING_ADDRESS = "vring address"
    MEMORY_TABLE = "memory regions description"
    MEMORY_REGION = "single memory region description"
    LOG = "log description"
    CONFIG = "device config space"
    INFLIGHT = "inflight description"
    IOTLB = "IOTLB message"
    DEVICE_STATE = "device state transfer"
    SHARED_OBJECT = "shared object UUID"
    OPAQUE = "opaque"

    def allows(self, size: int) -> bool:
        """Tell whether a payload of ``size`` bytes can have this layout."""
        if self is PayloadLayout.MEMORY_TABLE:
            regions, remainder = divmod(size - _MEMORY_TABLE_HEADER.size, _REGION_SIZE)
            return remainder == 0 and 0 <= regions <= MAX_MEMORY_REGIONS
        if self is PayloadLayout.CONFIG:
            return _CONFIG_HEADER.size <= size <= _CONFIG_HEADER.size + MAX_CONFIG_SIZE
        if self is PayloadLayout.OPAQUE:
            return size <= MAX_OPAQUE_SIZE
        return size == _FIXED_SIZES[self]

    def describe(self) -> str:
        """Describe the sizes this layout allows, for error messages."""
        if self is PayloadLayout.MEMORY_TABLE:
            return f"8 + 32 * nregions bytes with nregions <= {MAX_MEMORY_REGIONS}"
        if self is PayloadLayout.CONFIG:
            return f"12 to {12 + MAX_CONFIG_SIZE} bytes ({self.value})"
        if self is PayloadLayout.OPAQUE:
            return f"at most {MAX_OPAQUE_SIZE} bytes"
        return f"{_FIXED_SIZES[self]} bytes ({self.value})"


_REGION_SIZE = _MEMORY_REGION.size
_FIXED_SIZES = {
    PayloadLayout.NONE: 0,
    PayloadLayout.U64: _U64.size,
    PayloadLayout.VRING_STATE: _VRING_STATE.size,
    PayloadLayout.VRING_ADDRESS: _VRING_ADDRESS.size,
    PayloadLayout.MEMORY_REGION: _MEMORY_REGION_MESSAGE.size,
    PayloadLayout.LOG: _LOG.size,
    PayloadLayout.INFLIGHT: _INFLIGHT.size,
    PayloadLayout.IOTLB: _IOTLB.size,
    PayloadLayout.DEVICE_STATE: _DEVICE_STATE.size,
    PayloadLayout.SHARED_OBJECT: _SHARED_OBJECT.size,
}

_L = PayloadLayout
#: Request payload layout of every front-end request.
REQUEST_LAYOUTS: dict[Request, PayloadLayout] = {
    Request.GET_FEATURES: _L.NONE,
    Request.SET_FEATURES: _L.U64,
    Request.SET_OWNER: _L.NONE,
    Request.RESET_OWNER: _L.NONE,
    Request.SET_MEM_TABLE: _L.MEMORY_TABLE,
    Request.SET_LOG_BASE: _L.LOG,
    Request.SET_LOG_FD: _L.NONE,
    Request.SET_VRING_NUM: _L.VRING_STATE,
    Request.SET_VRING_ADDR: _L.VRING_ADDRESS,
    Request.SET_VRING_BASE: _L.VRING_STATE,
    Request.GET_VRING_BASE: _L.VRING_STATE,
    Request.SET_VRING_KICK: _L.U64,
    Request.SET_VRING_CALL: _L.U64,
    Request.SET_VRING_ERR: _L.U64,
    Request.GET_PROTOCOL_FEATURES: _L.NONE,
    Request.SET_PROTOCOL_FEATURES: _L.U64,
    Request.GET_QUEUE_NUM: _L.NONE,
    Request.SET_VRING_ENABLE: _L.VRING_STATE,
    Request.SEND_RARP: _L.U64,
    Request.NET_SET_MTU: _L.U64,
    Request.SET_BACKEND_REQ_FD: _L.NONE,
    Request.IOTLB_MSG: _L.IOTLB,
    Request.SET_VRING_ENDIAN: _L.VRING_STATE,
    Request.GET_CONFIG: _L.CONFIG,
    Request.SET_CONFIG: _L.CONFIG,
    Request.CREATE_CRYPTO_SESSION: _L.OPAQUE,
    Request.CLOSE_CRYPTO_SESSION: _L.U64,
    Request.POSTCOPY_ADVISE: _L.NONE,
    Request.POSTCOPY_LISTEN: _L.NONE,
    Request.POSTCOPY_END: _L.NONE,
    Request.GET_INFLIGHT_FD: _L.INFLIGHT,
    Request.SET_INFLIGHT_FD: _L.INFLIGHT,
    Request.GPU_SET_SOCKET: _L.NONE,
    Request.RESET_DEVICE: _L.NONE,
    Request.VRING_KICK: _L.VRING_STATE,
    Request.GET_MAX_MEM_SLOTS: _L.NONE,
    Request.ADD_MEM_REG: _L.MEMORY_REGION,
    Request.REM_MEM_REG: _L.MEMORY_REGION,
    Request.SET_STATUS: _L.U64,
    Request.GET_STATUS: _L.NONE,
    Request.GET_SHARED_OBJECT: _L.SHARED_OBJECT,
    Request.SET_DEVICE_STATE_FD: _L.DEVICE_STATE,
    Request.CHECK_DEVICE_STATE: _L.NONE,
}

#: Reply payload layout of the requests that always get a reply; any other
#: request is acknowledged with a u64 when it sets NEED_REPLY.
REPLY_LAYOUTS: dict[Request, PayloadLayout] = {
    Request.GET_FEATURES: _L.U64,
    Request.GET_PROTOCOL_FEATURES: _L.U64,
    Request.GET_VRING_BASE: _L.VRING_STATE,
    Request.GET_QUEUE_NUM: _L.U64,
    Request.GET_CONFIG: _L.CONFIG,
    Request.GET_INFLIGHT_FD: _L.INFLIGHT,
    Request.GET_MAX_MEM_SLOTS: _L.U64,
    Request.GET_STATUS: _L.U64,
    Request.IOTLB_MSG: _L.U64,
    Request.POSTCOPY_END: _L.U64,
    Request.SET_DEVICE_STATE_FD: _L.U64,
    Request.CHECK_DEVICE_STATE: _L.U64,
    Request.GET_SHARED_OBJECT: _L.U64,
}

#: Requests that may carry file descriptors. Every other request must carry
#: none, and the reader rejects it otherwise.
FD_REQUESTS = frozenset(
    {
        Request.SET_MEM_TABLE,
        Request.SET_LOG_BASE,
        Request.SET_LOG_FD,
        Request.SET_VRING_KICK,
        Request.SET_VRING_CALL,
        Request.SET_VRING_ERR,
        Request.SET_BACKEND_REQ_FD,
        Request.SET_INFLIGHT_FD,
        Request.GPU_SET_SOCKET,
        Request.ADD_MEM_REG,
        Request.REM_MEM_REG,
        Request.SET_DEVICE_STATE_FD,
    }
)


def request_name(code: int) -> str:
    """Return the specification name of a request code, or ``REQUEST_<code>``."""
    try:
        return Request(code).name
    except ValueError:
        return f"REQUEST_{code}"


@dataclass(frozen=True)
class VringState:
    """A vring state description: a ring index and a number."""

    index: int
    num: int


@dataclass(frozen=True)
class VringAddress:
    """A vring address description; ring addresses are front-end user addresses."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


@dataclass(frozen=True)
class VhostMemoryRegion:
    """One region of a memory table, with the specification's field names."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def __str__(self) -> str:
        return (
            f"region gpa {self.guest_phys_addr:#x} size {self.memory_size:#x}"
            f" user address {self.userspace_addr:#x}"
        )


@dataclass(frozen=True)
class ConfigSpace:
    """A virtio device config space access (GET_CONFIG, SET_CONFIG)."""

    offset: int
    flags: int
    data: bytes


@dataclass
class Message:
    """One decoded header with its raw payload and the descriptors it carried.

    The receiver owns ``fds``. Code that keeps a descriptor removes it from
    the list, and the server closes the rest after handling.
    """

    request: Request
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The request name, as log lines and errors spell it."""
        return self.request.name

    @property
    def need_reply(self) -> bool:
        """True when the front-end set NEED_REPLY."""
        return bool(self.flags & FLAG_NEED_REPLY)


class MessageReader:
    """Frame a byte stream into messages, validating each header first.

    Call ``bytes_needed`` and read at most that many bytes, so that one read
    never spans two messages and descriptors stay with their message. Then
    pass the bytes and any received descriptors to ``feed``. With
    ``replies=True`` the reader accepts back-end replies instead of requests,
    which is what a front-end (the tests' fake one) needs.
    """

    def __init__(self, *, replies: bool = False) -> None:
        self.replies = replies
        self._buffer = bytearray()
        self._header: tuple[Request, int, int] | None = None
        self._fds: list[int] = []

    def bytes_needed(self) -> int:
        """Return how many bytes complete the header or the payload in progress."""
        if self._header is None:
            return HEADER_SIZE - len(self._buffer)
        return self._header[2] - len(self._buffer)

    @property
    def in_progress(self) -> bool:
        """True when part of a message has been received."""
        return self._header is not None or bool(self._buffer)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> Message | None:
        """Add received bytes and descriptors; return the message they complete.

        Raises a ``VhostUserError`` for a bad header, or for descriptors on a
        request that takes none. The descriptors received so far then stay
        with the reader, and ``take_fds`` returns them for closing.
        """
        if len(data) > self.bytes_needed():
            raise ValueError(
                f"fed {len(data)} bytes but the message needs {self.bytes_needed()}"
            )
        self._fds.extend(fds)
        self._buffer += data
        if self._header is None:
            if len(self._buffer) < HEADER_SIZE:
                return None
            self._header = self._decode_header(bytes(self._buffer))
            self._buffer.clear()
        request, flags, size = self._header
        if len(self._buffer) < size:
            return None
        message = Message(request, flags, bytes(self._buffer), self.take_fds())
        self._header = None
        self._buffer.clear()
        if message.fds and request not in FD_REQUESTS and not self.replies:
            self._fds = message.fds
            raise FdCountError(message.name, len(message.fds), 0)
        return message

    def take_fds(self) -> list[int]:
        """Remove and return the descriptors of the message in progress."""
        fds, self._fds = self._fds, []
        return fds

    def _decode_header(self, header: bytes) -> tuple[Request, int, int]:
        code, flags, size = _HEADER.unpack(header)
        try:
            request = Request(code)
        except ValueError:
            raise UnknownRequestError(code) from None
        name = request.name
        if flags & FLAG_VERSION_MASK != VERSION:
            raise HeaderError(name, f"flags {flags:#x}: unsupported version")
        allowed = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY
        if flags & ~allowed:
            raise HeaderError(name, f"flags {flags:#x}: unknown flag bits")
        if self.replies:
            if not flags & FLAG_REPLY:
                raise HeaderError(name, f"flags {flags:#x}: reply flag missing")
            layout = REPLY_LAYOUTS.get(request, PayloadLayout.U64)
        else:
            if flags & FLAG_REPLY:
                raise HeaderError(name, f"flags {flags:#x}: reply flag in a request")
            layout = REQUEST_LAYOUTS[request]
        if not layout.allows(size):
            raise PayloadSizeError(name, size, layout.describe())
        return request, flags, size


def decode_u64(message: Message) -> int:
    """Decode a u64 payload."""
    _check_size(message, _U64.size)
    return _U64.unpack(message.payload)[0]


def decode_vring_state(message: Message) -> VringState:
    """Decode a vring state description."""
    _check_size(message, _VRING_STATE.size)
    return VringState(*_VRING_STATE.unpack(message.payload))


def decode_vring_address(message: Message) -> VringAddress:
    """Decode a vring address description."""
    _check_size(message, _VRING_ADDRESS.size)
    index, flags, desc, used, avail, log = _VRING_ADDRESS.unpack(message.payload)
    return VringAddress(index, flags, desc, used, avail, log)


def decode_ring_fd(message: Message) -> tuple[int, int | None]:
    """Decode SET_VRING_KICK, SET_VRING_CALL or SET_VRING_ERR.

    Returns the ring index and the descriptor, which is None when the payload
    has the NOFD flag. The descriptor is removed from ``message.fds``.
    Raises ``HeaderError`` for payload bits beyond the index and the flag, and
    ``FdCountError`` when the descriptor count does not match the flag.
    """
    value = decode_u64(message)
    if value & ~(VRING_INDEX_MASK | VRING_NOFD_FLAG):
        raise HeaderError(
            message.name,
            f"payload {value:#x} has bits set beyond the ring index and the NOFD flag",
        )
    expected = 0 if value & VRING_NOFD_FLAG else 1
    if len(message.fds) != expected:
        raise FdCountError(message.name, len(message.fds), expected)
    fd = message.fds.pop() if expected else None
    return value & VRING_INDEX_MASK, fd


def decode_memory_table(message: Message) -> list[VhostMemoryRegion]:
    """Decode SET_MEM_TABLE and check its regions and descriptor count.

    The payload may hold exactly ``nregions`` regions (QEMU 7.2 sends that) or
    all eight slots of the C struct. Raises ``MemoryTableError`` for more than
    eight regions or invalid regions (see ``check_regions``), and
    ``FdCountError`` unless there is one descriptor a region.
    """
    name = message.name
    nregions, _padding = _MEMORY_TABLE_HEADER.unpack_from(message.payload)
    if nregions > MAX_MEMORY_REGIONS:
        raise MemoryTableError(
            name, f"nregions {nregions} exceeds the maximum of {MAX_MEMORY_REGIONS}"
        )
    exact = _MEMORY_TABLE_HEADER.size + nregions * _REGION_SIZE
    full = _MEMORY_TABLE_HEADER.size + MAX_MEMORY_REGIONS * _REGION_SIZE
    if len(message.payload) not in (exact, full):
        raise PayloadSizeError(
            name,
            len(message.payload),
            f"{exact} or {full} bytes for {nregions} regions",
        )
    regions = [
        VhostMemoryRegion(*_MEMORY_REGION.unpack_from(message.payload, offset))
        for offset in range(_MEMORY_TABLE_HEADER.size, exact, _REGION_SIZE)
    ]
    check_regions(name, regions)
    if len(message.fds) != nregions:
        raise FdCountError(name, len(message.fds), nregions)
    return regions


def decode_memory_region(message: Message) -> VhostMemoryRegion:
    """Decode the single memory region description of ADD_MEM_REG or REM_MEM_REG.

    Descriptors are left in ``message.fds``, because the two requests differ:
    ADD_MEM_REG needs exactly one and REM_MEM_REG ignores one if present.
    """
    _check_size(message, _MEMORY_REGION_MESSAGE.size)
    _padding, *fields = _MEMORY_REGION_MESSAGE.unpack(message.payload)
    region = VhostMemoryRegion(*fields)
    check_regions(message.name, [region])
    return region


def decode_config(message: Message) -> tuple[ConfigSpace, int]:
    """Decode a device config space access; return it and its ``size`` field."""
    offset, size, flags = _CONFIG_HEADER.unpack_from(message.payload)
    data = message.payload[_CONFIG_HEADER.size :]
    if size > MAX_CONFIG_SIZE or (data and size != len(data)):
        raise PayloadSizeError(
            message.name, len(message.payload), f"a size field that matches, not {size}"
        )
    return ConfigSpace(offset, flags, data), size


def check_regions(request: str, regions: Sequence[VhostMemoryRegion]) -> None:
    """Raise ``MemoryTableError`` unless the regions are valid and disjoint.

    A region must be non-empty, and none of its ranges (guest-physical, user
    address and file offset) may pass 2**64. Two regions may not overlap in
    guest-physical or user address space, because translation would then be
    ambiguous.
    """
    limit = 1 << 64
    for region in regions:
        if region.memory_size == 0:
            raise MemoryTableError(request, f"{region}: size is zero")
        for label, start in (
            ("guest address", region.guest_phys_addr),
            ("user address", region.userspace_addr),
            ("mmap offset", region.mmap_offset),
        ):
            if start + region.memory_size > limit:
                raise MemoryTableError(request, f"{region}: {label} range overflows")
    for key, label in (
        (lambda r: r.guest_phys_addr, "guest"),
        (lambda r: r.userspace_addr, "user"),
    ):
        ordered = sorted(regions, key=key)
        for before, after in itertools.pairwise(ordered):
            if key(after) < key(before) + before.memory_size:
                raise MemoryTableError(
                    request, f"{before} and {after} overlap in {label} address space"
                )


def _check_size(message: Message, size: int) -> None:
    if len(message.payload) != size:
        raise PayloadSizeError(message.name, len(message.payload), f"{size} bytes")


def encode_message(
    request: Request, payload: bytes = b"", flags: int = VERSION
) -> bytes:
    """Encode a header and payload."""
    return _HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: Request, payload: bytes) -> bytes:
    """Encode a back-end reply to ``request``."""
    return encode_message(request, payload, VERSION | FLAG_REPLY)


def encode_u64(value: int) -> bytes:
    """Encode a u64 payload."""
    return _U64.pack(value)


def encode_vring_state(index: int, num: int) -> bytes:
    """Encode a vring state description."""
    return _VRING_STATE.pack(index, num)


def encode_vring_address(address: VringAddress) -> bytes:
    """Encode a vring address description."""
    return _VRING_ADDRESS.pack(
        address.index,
        address.flags,
        address.desc_user_addr,
        address.used_user_addr,
        address.avail_user_addr,
        address.log_guest_addr,
    )


def encode_memory_table(
    regions: Sequence[VhostMemoryRegion], *, full: bool = False
) -> bytes:
    """Encode a memory regions description, padded to eight slots if ``full``."""
    payload = _MEMORY_TABLE_HEADER.pack(len(regions), 0) + b"".join(
        _pack_region(region) for region in regions
    )
    if full:
        payload += bytes(_REGION_SIZE * (MAX_MEMORY_REGIONS - len(regions)))
    return payload


def encode_memory_region(region: VhostMemoryRegion) -> bytes:
    """Encode a single memory region description (ADD_MEM_REG, REM_MEM_REG)."""
    return bytes(8) + _pack_region(region)


def encode_config(offset: int, flags: int, data: bytes) -> bytes:
    """Encode a device config space access."""
    return _CONFIG_HEADER.pack(offset, len(data), flags) + data


def _pack_region(region: VhostMemoryRegion) -> bytes:
    return _MEMORY_REGION.pack(
        region.guest_phys_addr,
        region.memory_size,
        region.userspace_addr,
        region.mmap_offset,
    )
