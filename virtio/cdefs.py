"""The spec's C layouts, declared once with cffi.

These declarations are the reference for every size and offset the package
uses: ``virtio.layout`` derives the ring geometry from them, and the tests
check them against the numbers the virtio 1.2 specification gives (2.7.5,
2.7.6, 2.7.8, 5.1.6). The per-packet path reads these structures with
``struct`` and ``memoryview.cast`` instead, because cffi field access is
slower per field (measured in ``virtio-net-emu bench``); the tests also check
that those struct formats agree with the layouts here.
"""

from __future__ import annotations

import cffi

__all__ = ["ffi", "sizeof", "offsetof"]

ffi = cffi.FFI()
ffi.cdef(
    """
    struct vring_desc {
        uint64_t addr;
        uint32_t len;
        uint16_t flags;
        uint16_t next;
    };

    struct vring_avail {
        uint16_t flags;
        uint16_t idx;
        uint16_t ring[];
    };

    struct vring_used_elem {
        uint32_t id;
        uint32_t len;
    };

    struct vring_used {
        uint16_t flags;
        uint16_t idx;
        struct vring_used_elem ring[];
    };

    struct virtio_net_hdr {
        uint8_t flags;
        uint8_t gso_type;
        uint16_t hdr_len;
        uint16_t gso_size;
        uint16_t csum_start;
        uint16_t csum_offset;
    };

    struct virtio_net_hdr_mrg_rxbuf {
        struct virtio_net_hdr hdr;
        uint16_t num_buffers;
    };

    struct virtio_net_hdr_v1_hash {
        struct virtio_net_hdr_mrg_rxbuf hdr;
        uint32_t hash_value;
        uint16_t hash_report;
        uint16_t padding;
    };

    struct virtio_net_config {
        uint8_t mac[6];
        uint16_t status;
        uint16_t max_virtqueue_pairs;
        uint16_t mtu;
    };

    struct virtio_net_ctrl_hdr {
        uint8_t class;
        uint8_t cmd;
    };
    """,
    packed=False,
)


def sizeof(name: str) -> int:
    """Return the size in bytes of a declared C type, e.g. ``struct vring_desc``."""
    return ffi.sizeof(name)


def offsetof(name: str, field: str) -> int:
    """Return the byte offset of ``field`` in a declared C struct."""
    return ffi.offsetof(name, field)
