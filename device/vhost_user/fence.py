"""A full memory barrier callable from Python, for memory shared with a front-end.

With vhost-user the driver runs in another process on another CPU, so the
virtqueue code needs a real store-load barrier where the virtio specification
requires one (for example between writing the used index and reading the
driver's event suppression fields). Python has no such primitive. This module
calls C11 ``atomic_thread_fence(memory_order_seq_cst)`` from libatomic through
cffi in ABI mode, so no compiler is needed. On x86-64, libatomic 12 (Debian
12) implements it as ``lock orq $0, (%rsp)``, a locked instruction and
therefore a full barrier.
"""

from __future__ import annotations

from collections.abc import Callable

import cffi

__all__ = ["LIBATOMIC", "load_full_fence"]

#: Shared library that exports ``atomic_thread_fence`` (Debian package libatomic1).
LIBATOMIC = "libatomic.so.1"

_MEMORY_ORDER_SEQ_CST = 5

_ffi = cffi.FFI()
_ffi.cdef("void atomic_thread_fence(int order);")


def load_full_fence(library: str = LIBATOMIC) -> Callable[[], None]:
    """Return a function that executes a sequentially consistent fence.

    Raises ``OSError`` naming the library when it cannot be loaded; install
    libatomic1, or pass the server a fence of your own.
    """
    try:
        lib = _ffi.dlopen(library)
    except OSError as error:
        raise OSError(
            f"cannot load {library} for the memory fence ({error});"
            " install the libatomic1 package"
        ) from None
    fence_function = lib.atomic_thread_fence

    def full_fence() -> None:
        fence_function(_MEMORY_ORDER_SEQ_CST)

    # Keep the library loaded for as long as the function lives.
    full_fence.library = lib  # type: ignore[attr-defined]
    return full_fence
