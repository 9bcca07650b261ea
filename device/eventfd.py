"""Notifiers over eventfds, for real event loops (vhost-user, live runs).

A kick arrives as a readable eventfd (the frontend or KVM wrote it);
``EventfdKick.drain`` reads the counter and delivers one kick however many
writes were coalesced, which is what eventfd semantics give a real device.
An interrupt is an ``eventfd_write`` of 1 on the call fd.
"""

from __future__ import annotations

import os

from .notifier import InterruptNotifier, KickNotifier

__all__ = ["EventfdKick", "EventfdInterrupt"]


class EventfdKick(KickNotifier):
    """Kicks for one queue, read from an eventfd by the event loop."""

    def __init__(self, fd: int, queue: int) -> None:
        super().__init__()
        self.fd = fd
        self.queue = queue

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> None:
        """Consume the eventfd counter and deliver one kick if it was set."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            return
        self.notify(self.queue)

    def notify(self, queue: int) -> None:
        self.kicks += 1
        self.handler(queue)


class EventfdInterrupt(InterruptNotifier):
    """Interrupts written to one call eventfd per queue (and one for config)."""

    def __init__(
        self, call_fds: dict[int, int] | None = None, config_fd: int | None = None
    ) -> None:
        super().__init__()
        self.call_fds: dict[int, int] = dict(call_fds or {})
        self.config_fd = config_fd
        self.errors = 0

    def _deliver(self, queue: int) -> None:
        fd = self.call_fds.get(queue)
        if fd is not None:
            self._write(fd)

    def _deliver_config(self) -> None:
        if self.config_fd is not None:
            self._write(self.config_fd)

    def _write(self, fd: int) -> None:
        try:
            os.eventfd_write(fd, 1)
        except OSError:
            # A closed call fd means the frontend went away; the connection
            # teardown reports that, so only count it here.
            self.errors += 1
