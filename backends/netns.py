"""Named network namespaces: create, delete, and run code inside one.

A named namespace is a bind mount of a namespace file at /run/netns/NAME, the
convention of iproute2's ``ip netns``, so namespaces created here show up in
``ip netns list`` and the other way round. Creation and deletion go through
pyroute2.

``enter_namespace`` switches only the calling thread, because setns(2) with
CLONE_NEWNET changes the namespace of one thread. Sockets and TAP file
descriptors keep the namespace they were created in after the thread leaves
it, so the usual pattern is to create them inside the block and use them
outside.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
from collections.abc import Iterator

from .errors import BackendError, NamespaceNotFoundError

__all__ = [
    "NAMESPACE_PREFIX",
    "NETNS_RUN_DIR",
    "create_namespace",
    "delete_namespace",
    "enter_namespace",
    "namespace_exists",
    "namespace_path",
    "network_namespace",
]

logger = logging.getLogger(__name__)

#: Directory of the namespace mounts, as iproute2 uses it.
NETNS_RUN_DIR = "/run/netns"
#: Prefix of the names that ``create_namespace`` generates.
NAMESPACE_PREFIX = "vne-"

# The thread's own namespace, not the process's: after setns(2) in one thread
# /proc/self/ns/net still names the namespace of the main thread.
_THREAD_NAMESPACE = "/proc/thread-self/ns/net"


def namespace_path(name: str) -> str:
    """Return the mount path of namespace ``name``.

    Raises ValueError for an empty name, ``.``, ``..`` or a name with a slash.
    """
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"invalid network namespace name {name!r}")
    return os.path.join(NETNS_RUN_DIR, name)


def namespace_exists(name: str) -> bool:
    """Tell whether ``name`` is a mounted network namespace under /run/netns.

    A leftover plain file at that path (from a creation that failed half way)
    does not count. Raises ValueError for an invalid name.
    """
    return os.path.ismount(namespace_path(name))


def create_namespace(name: str | None = None) -> str:
    """Create a network namespace and return its name.

    Without ``name``, the name is ``vne-`` followed by the process id and a
    random suffix. The new namespace contains only a loopback interface, which
    is down. Raises BackendError when the name exists (errno EEXIST) or when
    the caller lacks CAP_SYS_ADMIN (errno EPERM or EACCES).
    """
    from pyroute2 import netns as pyroute2_netns  # import takes about 0.15 s

    if name is None:
        name = f"{NAMESPACE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    path = namespace_path(name)
    try:
        pyroute2_netns.create(path)
    except FileExistsError as exc:
        raise BackendError(
            f"network namespace {name!r} already exists; choose another name or"
            f" delete it with `ip netns del {name}`",
            errno=exc.errno,
        ) from exc
    except OSError as exc:
        raise BackendError(
            f"creating network namespace {name!r} failed: {exc.strerror};"
            f" creating namespaces needs root (CAP_SYS_ADMIN)",
            errno=exc.errno,
        ) from exc
    logger.debug("created network namespace %s", name)
    return name


def delete_namespace(name: str) -> None:
    """Unmount and remove namespace ``name``.

    Interfaces inside it (TAPs, veths, bridges) are destroyed when the last
    process, socket or file descriptor that uses the namespace is gone, which
    can be later than this call. Raises NamespaceNotFoundError when it does
    not exist and BackendError when removing the mount fails.
    """
    from pyroute2 import netns as pyroute2_netns

    path = namespace_path(name)
    try:
        pyroute2_netns.remove(path)
    except FileNotFoundError as exc:
        raise NamespaceNotFoundError(name, path) from exc
    except OSError as exc:
        raise BackendError(
            f"deleting network namespace {name!r} failed: {exc.strerror}",
            errno=exc.errno,
        ) from exc
    logger.debug("deleted network namespace %s", name)


@contextlib.contextmanager
def network_namespace(name: str | None = None) -> Iterator[str]:
    """Create a network namespace for the block and delete it afterwards.

    Yields the namespace name. The namespace is deleted also when the block
    raises, and a namespace that the block already deleted is not an error.
    Raises what ``create_namespace`` raises.
    """
    name = create_namespace(name)
    try:
        yield name
    finally:
        with contextlib.suppress(NamespaceNotFoundError):
            delete_namespace(name)


@contextlib.contextmanager
def enter_namespace(name: str) -> Iterator[None]:
    """Run the block with the calling thread inside namespace ``name``.

    The thread returns to its previous namespace when the block ends, also
    when it raises. Raises NamespaceNotFoundError when the namespace does not
    exist, and BackendError when setns(2) fails, including the case where the
    thread cannot return to its previous namespace.
    """
    path = namespace_path(name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NamespaceNotFoundError(name, path) from exc
    try:
        original = os.open(_THREAD_NAMESPACE, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _set_thread_namespace(target, f"network namespace {name!r}")
            try:
                yield
            finally:
                _set_thread_namespace(original, "the previous network namespace")
        finally:
            os.close(original)
    finally:
        os.close(target)


def _set_thread_namespace(fd: int, description: str) -> None:
    from pyroute2 import netns as pyroute2_netns

    try:
        # flags=0: never create a namespace, and the fd stays open.
        pyroute2_netns.setns(fd, flags=0)
    except OSError as exc:
        code = exc.errno
        reason = os.strerror(code) if code else str(exc)
        hint = " (the file is not a network namespace)" if code == errno.EINVAL else ""
        raise BackendError(
            f"entering {description} failed: {reason}{hint}", errno=code
        ) from exc
