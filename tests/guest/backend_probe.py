"""Run ``virtio-net-emu vhost-user`` and also count the kick writes per ring.

An eventfd adds up the writes it gets until someone reads it, so one kick
the backend handles may cover several kicks of the guest. QEMU's built-in
device under TCG traces every write to the notify register
(``virtio_queue_notify``). To compare kicks per frame fairly, this script
runs the backend's own command with one change: the kick handler keeps the
counter value it reads and adds it up per ring. The JSON statistics then
carry ``probe_kick_writes`` (guest kicks) and ``probe_kick_wakeups`` (kicks
the backend handled), each keyed by ring index as a string.

TODO: drop this script once the backend reports the kick write count itself.

Usage: ``python tests/guest/backend_probe.py vhost-user ARGS...`` (the
arguments of ``virtio-net-emu``).
"""

from __future__ import annotations

import collections
import os
import sys
from typing import Any

from device.cli import main
from device.vhost_user.server import VhostUserServer
from device.vhost_user.service import NetService

_writes: collections.Counter[int] = collections.Counter()
_wakeups: collections.Counter[int] = collections.Counter()
_stats = NetService.stats


def _on_kick(server: VhostUserServer, fd: int, index: int) -> None:
    # Same steps as VhostUserServer._on_kick, which discards the value.
    try:
        value = os.eventfd_read(fd)
    except BlockingIOError:
        return
    _writes[index] += value
    _wakeups[index] += 1
    if server.session is not None:
        server.session.kick(index)


def _stats_with_probe(service: NetService) -> dict[str, Any]:
    stats = _stats(service)
    stats["probe_kick_writes"] = {str(ring): n for ring, n in _writes.items()}
    stats["probe_kick_wakeups"] = {str(ring): n for ring, n in _wakeups.items()}
    return stats


if __name__ == "__main__":
    VhostUserServer._on_kick = _on_kick  # type: ignore[method-assign]
    NetService.stats = _stats_with_probe  # type: ignore[method-assign]
    sys.exit(main(sys.argv[1:]))
