"""Network namespace helpers: create, delete, enter."""

from __future__ import annotations

import errno
import os
import socket
import threading

import pytest

from backends import (
    BackendError,
    NamespaceNotFoundError,
    create_namespace,
    delete_namespace,
    enter_namespace,
    namespace_exists,
    network_namespace,
)
from backends.netns import NETNS_RUN_DIR, namespace_path


def thread_namespace_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "nul\0"])
def test_invalid_namespace_name(name: str) -> None:
    with pytest.raises(ValueError, match="invalid network namespace name"):
        namespace_path(name)


def test_missing_namespace_not_exists() -> None:
    assert namespace_exists("vne-does-not-exist") is False


def test_enter_missing_namespace() -> None:
    with pytest.raises(NamespaceNotFoundError) as info:
        with enter_namespace("vne-does-not-exist"):
            pass

    assert info.value.name == "vne-does-not-exist"
    assert "ip netns add vne-does-not-exist" in str(info.value)


@pytest.mark.root
def test_network_namespace_lifecycle() -> None:
    with network_namespace() as name:
        inside = namespace_exists(name)

    assert name.startswith("vne-")
    assert inside is True
    assert namespace_exists(name) is False


@pytest.mark.root
def test_network_namespace_deleted_on_error() -> None:
    names = []
    with pytest.raises(RuntimeError):
        with network_namespace() as name:
            names.append(name)
            raise RuntimeError("test failure")

    assert namespace_exists(names[0]) is False


@pytest.mark.root
def test_network_namespace_deleted_inside_block() -> None:
    with network_namespace() as name:
        delete_namespace(name)

    assert namespace_exists(name) is False


@pytest.mark.root
def test_generated_names_unique() -> None:
    with network_namespace() as first, network_namespace() as second:
        assert first != second


@pytest.mark.root
def test_create_existing_namespace(netns: str) -> None:
    with pytest.raises(BackendError) as info:
        create_namespace(netns)

    assert info.value.errno == errno.EEXIST
    assert "already exists" in str(info.value)


@pytest.mark.root
def test_delete_missing_namespace() -> None:
    with pytest.raises(NamespaceNotFoundError) as info:
        delete_namespace("vne-does-not-exist")

    assert info.value.path == os.path.join(NETNS_RUN_DIR, "vne-does-not-exist")


@pytest.mark.root
def test_enter_namespace_sees_only_loopback(netns: str) -> None:
    outside = thread_namespace_inode()
    with enter_namespace(netns):
        inside = thread_namespace_inode()
        interfaces = [name for _, name in socket.if_nameindex()]

    assert inside != outside
    assert interfaces == ["lo"]
    assert thread_namespace_inode() == outside


@pytest.mark.root
def test_enter_namespace_restores_on_error(netns: str) -> None:
    outside = thread_namespace_inode()
    with pytest.raises(RuntimeError):
        with enter_namespace(netns):
            raise RuntimeError("test failure")

    assert thread_namespace_inode() == outside


@pytest.mark.root
def test_enter_namespace_nested(netns: str) -> None:
    outside = thread_namespace_inode()
    with network_namespace() as other:
        with enter_namespace(netns):
            first = thread_namespace_inode()
            with enter_namespace(other):
                second = thread_namespace_inode()
            back_in_first = thread_namespace_inode()

    assert len({outside, first, second}) == 3
    assert back_in_first == first
    assert thread_namespace_inode() == outside


@pytest.mark.root
def test_enter_namespace_only_this_thread(netns: str) -> None:
    main_before = thread_namespace_inode()
    seen: dict[str, int] = {}
    entered = threading.Event()
    release = threading.Event()

    def worker() -> None:
        with enter_namespace(netns):
            seen["worker"] = thread_namespace_inode()
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert entered.wait(5)
        seen["main"] = thread_namespace_inode()
    finally:
        release.set()
        thread.join(5)

    assert seen["worker"] != main_before
    assert seen["main"] == main_before


SO_NETNS_COOKIE = 71  # Linux 5.14 and later


def namespace_cookie(sock: socket.socket) -> int:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    except OSError as exc:
        pytest.skip(f"SO_NETNS_COOKIE is not supported: {exc}")
    return int.from_bytes(raw, "little")


@pytest.mark.root
def test_socket_keeps_namespace(netns: str) -> None:
    with enter_namespace(netns):
        inside = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        inside_again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    outside = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with inside, inside_again, outside:
        cookies = [namespace_cookie(s) for s in (inside, inside_again, outside)]

    assert cookies[0] == cookies[1]
    assert cookies[0] != cookies[2]


@pytest.mark.root
def test_stale_file_not_a_namespace() -> None:
    name = f"vne-stale-{os.getpid()}"
    path = namespace_path(name)
    os.makedirs(NETNS_RUN_DIR, exist_ok=True)
    with open(path, "x"):
        pass
    try:
        exists = namespace_exists(name)
        with pytest.raises(BackendError) as info:
            with enter_namespace(name):
                pass
    finally:
        os.unlink(path)

    assert exists is False
    assert info.value.errno == errno.EINVAL
    assert "not a network namespace" in str(info.value)
