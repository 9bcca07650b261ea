"""A vhost-user back-end on a Unix stream socket, driven by one selector.

The server listens on a socket path and serves one front-end at a time. A
second front-end waits in the listen backlog until the first disconnects.
One ``selectors`` selector watches the listening socket, the connection, the
kick eventfds of running queues and any descriptor the device adds with
``add_reader``. ``poll`` handles what is ready and returns, so the server runs
either alone (``serve_forever``) or inside another event loop, which waits on
``fileno()`` and calls ``poll(0)``. Everything happens on the calling thread.

Per message the server decodes, lets the ``Session`` apply it and sends the
reply. An invalid message is logged as one error line naming the request and
the reason. The server then closes that connection, stops the device's
queues, unmaps the memory, and waits for the next front-end. A front-end that
disconnects (EOF, ECONNRESET) gets the same cleanup, logged at INFO level.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import select
import selectors
import socket
import stat
import threading
from collections import Counter
from collections.abc import Callable
from typing import Self

from .adapter import VhostUserDevice
from .errors import FdCountError, VhostUserError
from .fence import load_full_fence
from .protocol import MAX_FDS_PER_MESSAGE, Message, MessageReader
from .session import DEFAULT_PROTOCOL_FEATURES, SUPPORTED_PROTOCOL_FEATURES, Session

__all__ = ["SEND_TIMEOUT", "VhostUserServer"]

logger = logging.getLogger(__name__)

#: Seconds a reply may wait for room in the socket buffer before the server
#: gives up on the front-end. Replies are at most a few hundred bytes, so only
#: a front-end that stopped reading hits this.
SEND_TIMEOUT = 5.0

_FD_SIZE = array.array("i").itemsize
_ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD_SIZE)

_LISTENER = "listener"
_CONNECTION = "connection"
_KICK = "kick"
_READER = "reader"


class VhostUserServer:
    """Serve ``device`` to vhost-user front-ends connecting to ``path``.

    ``path`` may be None for a server that only serves sockets passed to
    ``attach`` (the back-end convention's ``--fd``, or a socketpair in tests).
    An existing socket file at ``path`` is removed first. Any other existing
    file raises ``FileExistsError``. ``fence`` defaults to a libatomic full
    barrier. ``protocol_features`` is the mask offered in
    GET_PROTOCOL_FEATURES.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        device: VhostUserDevice,
        *,
        fence: Callable[[], None] | None = None,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
    ) -> None:
        unsupported = protocol_features & ~SUPPORTED_PROTOCOL_FEATURES
        if unsupported:
            raise ValueError(
                f"protocol features {unsupported:#x} are not implemented; the"
                f" supported mask is {SUPPORTED_PROTOCOL_FEATURES:#x}"
            )
        self.device = device
        self.fence = fence if fence is not None else load_full_fence()
        self.protocol_features = protocol_features
        self.counters: Counter[str] = Counter()
        self.session: Session | None = None
        self._selector = selectors.DefaultSelector()
        self._connection: socket.socket | None = None
        self._reader = MessageReader()
        self.path = os.fspath(path) if path is not None else None
        self._listener: socket.socket | None = None
        self._listener_inode: int | None = None
        if self.path is not None:
            self._listen(self.path)

    # -- public API ----------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a front-end is connected."""
        return self._connection is not None

    def fileno(self) -> int:
        """Return the selector's descriptor, readable when ``poll`` has work."""
        return self._selector.fileno()

    def attach(self, connection: socket.socket) -> None:
        """Serve an already connected front-end socket; the server takes it over.

        Raises ``RuntimeError`` while another front-end is connected.
        """
        if self._connection is not None:
            raise RuntimeError("a front-end is already connected")
        self.session = Session(
            self.device,
            self.fence,
            protocol_features=self.protocol_features,
            watch_kick=self._watch_kick,
            unwatch_kick=self._unwatch_kick,
            counters=self.counters,
        )
        connection.setblocking(False)
        self._connection = connection
        self._reader = MessageReader()
        self._selector.register(connection, selectors.EVENT_READ, (_CONNECTION, None))
        if self._listener is not None:
            self._selector.unregister(self._listener)
        self.counters["connections"] += 1

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` from ``poll`` whenever ``fd`` is readable."""
        self._selector.register(fd, selectors.EVENT_READ, (_READER, callback))

    def remove_reader(self, fd: int) -> None:
        """Stop watching a descriptor added with ``add_reader``."""
        self._selector.unregister(fd)

    def poll(self, timeout: float | None = None) -> int:
        """Wait up to ``timeout`` seconds and handle every ready event.

        ``None`` waits without limit and 0 does not wait. Returns the number
        of events handled.
        """
        events = self._selector.select(timeout)
        for key, _mask in events:
            # An earlier event of this round may have closed this descriptor,
            # and a descriptor received since may reuse its number.
            if self._selector.get_map().get(key.fd) is not key:
                continue
            kind, value = key.data
            if kind == _CONNECTION:
                self._on_connection_readable()
            elif kind == _KICK:
                self._on_kick(key.fd, value)
            elif kind == _LISTENER:
                self._accept()
            else:
                value()
        return len(events)

    def serve_forever(
        self, stop: threading.Event | None = None, interval: float = 0.5
    ) -> None:
        """Call ``poll`` until ``stop`` is set, checking it every ``interval`` s."""
        while stop is None or not stop.is_set():
            self.poll(interval)

    def disconnect(self) -> None:
        """Close the current connection, if any, as if the front-end had left."""
        if self._connection is not None:
            self._close_connection()

    def close(self) -> None:
        """Close the connection and the listening socket, and remove the path."""
        self.disconnect()
        if self._listener is not None:
            if self._listener.fileno() in self._selector.get_map():
                self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
            self._remove_socket_file()
        self._selector.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- listening -----------------------------------------------------------

    def _listen(self, path: str) -> None:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            os.unlink(path)
        listener = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
        )
        try:
            listener.bind(path)
            listener.listen(1)
        except OSError:
            listener.close()
            raise
        listener.setblocking(False)
        self._listener = listener
        self._listener_inode = os.stat(path).st_ino
        self._selector.register(listener, selectors.EVENT_READ, (_LISTENER, None))
        logger.info("listening for vhost-user front-ends on %s", path)

    def _remove_socket_file(self) -> None:
        assert self.path is not None
        try:
            if os.stat(self.path).st_ino == self._listener_inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            connection, _address = self._listener.accept()
        except BlockingIOError:
            return
        logger.info("front-end connected on %s", self.path)
        self.attach(connection)

    # -- connection ----------------------------------------------------------

    def _on_connection_readable(self) -> None:
        """Read and handle every complete message the socket has."""
        while self._connection is not None:
            try:
                data, fds = self._receive(self._reader.bytes_needed())
            except BlockingIOError:
                return
            except VhostUserError as error:
                self._fail(error, None)
                return
            except OSError as error:
                self._close_connection(f"receive failed: {error}")
                return
            if not data:
                _close_all(fds)
                self._on_end_of_stream()
                return
            try:
                message = self._reader.feed(data, fds)
            except VhostUserError as error:
                self._fail(error, None)
                return
            if message is not None:
                self._dispatch(message)

    def _receive(self, size: int) -> tuple[bytes, list[int]]:
        assert self._connection is not None
        data, ancillary, flags, _address = self._connection.recvmsg(
            size, _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
        )
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
                fds.extend(received)
        if flags & socket.MSG_CTRUNC:
            _close_all(fds)
            raise FdCountError(
                None,
                f"more than {MAX_FDS_PER_MESSAGE}",
                f"at most {MAX_FDS_PER_MESSAGE}",
            )
        return data, fds

    def _on_end_of_stream(self) -> None:
        if self._reader.in_progress:
            self._close_connection("front-end closed the connection inside a message")
        else:
            self._close_connection("front-end closed the connection")

    def _dispatch(self, message: Message) -> None:
        assert self.session is not None
        logger.debug(
            "%s flags %#x size %d fds %d",
            message.name,
            message.flags,
            len(message.payload),
            len(message.fds),
        )
        try:
            reply = self.session.handle(message)
        except VhostUserError as error:
            self._fail(error, message)
            return
        finally:
            _close_all(message.fds)
        if reply is not None:
            try:
                self._send(reply)
            except OSError as error:
                self._close_connection(
                    f"sending the {message.name} reply failed: {error}"
                )

    def _fail(self, error: VhostUserError, message: Message | None) -> None:
        """Log a rejected message, report it if asked, and close the connection."""
        self.counters["protocol_errors"] += 1
        self.counters[f"error_{error.kind}"] += 1
        logger.error("closing vhost-user connection: %s", error)
        if message is not None and self.session is not None:
            reply = self.session.failure_reply(message)
            if reply is not None:
                try:
                    self._send(reply)
                except OSError as send_error:
                    logger.debug("failure reply not sent: %s", send_error)
        self._close_connection()

    def _send(self, data: bytes) -> None:
        assert self._connection is not None
        view = memoryview(data)
        while view:
            try:
                sent = self._connection.send(view)
            except BlockingIOError:
                # poll, unlike select, works for descriptors past FD_SETSIZE.
                waiter = select.poll()
                waiter.register(self._connection, select.POLLOUT)
                if not waiter.poll(SEND_TIMEOUT * 1000):
                    raise TimeoutError(
                        errno.ETIMEDOUT, f"reply not sent within {SEND_TIMEOUT} s"
                    ) from None
                continue
            view = view[sent:]

    def _close_connection(self, reason: str | None = None) -> None:
        """Stop the device's queues, unmap memory, close descriptors and socket."""
        if reason is not None:
            logger.info("%s; cleaning up", reason)
        connection, self._connection = self._connection, None
        if self.session is not None:
            self.session.close()
            self.session = None
        _close_all(self._reader.take_fds())
        self._reader = MessageReader()
        if connection is not None:
            self._selector.unregister(connection)
            connection.close()
        self.counters["disconnects"] += 1
        if self._listener is not None:
            self._selector.register(
                self._listener, selectors.EVENT_READ, (_LISTENER, None)
            )
            logger.info("waiting for the next front-end on %s", self.path)

    # -- kicks ---------------------------------------------------------------

    def _watch_kick(self, fd: int, index: int) -> None:
        self._selector.register(fd, selectors.EVENT_READ, (_KICK, index))

    def _unwatch_kick(self, fd: int) -> None:
        self._selector.unregister(fd)

    def _on_kick(self, fd: int, index: int) -> None:
        try:
            # The eventfd counter adds up the frontend's writes since the last
            # read: one wake-up may stand for many guest kicks.
            writes = os.eventfd_read(fd)
        except BlockingIOError:
            return
        if self.session is not None:
            self.session.kick(index, writes)


def _close_all(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())
