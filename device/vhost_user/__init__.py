"""The vhost-user back-end: protocol codec, connection server and device adapter.

``VhostUserServer`` serves a ``VhostUserDevice`` (see ``adapter``) to a
vhost-user front-end such as QEMU or DPDK's net_virtio_user over a Unix
socket. Modules: ``protocol`` (message codec), ``session`` (per-connection
state), ``memory_table`` (mapped regions), ``vring`` (ring set-up state),
``fence`` (memory barrier) and ``server`` (socket and event loop).
``net_adapter`` serves the virtio-net device, ``service`` runs it with a
backend in one event loop, ``cli`` is the ``virtio-net-emu vhost-user``
command and ``testpmd`` drives dpdk-testpmd for tests and benchmarks.

Start-up sequences seen against this server (tests/vhost_user has both):

- QEMU 7.2 at device creation: GET_FEATURES, GET_PROTOCOL_FEATURES,
  SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER, GET_FEATURES, then
  SET_VRING_CALL and SET_VRING_ERR per ring, then SET_VRING_ENABLE 1 per
  ring, all before any memory table.
- dpdk-testpmd 22.11: SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES,
  SET_PROTOCOL_FEATURES (MQ | REPLY_ACK), SET_VRING_CALL per ring,
  SET_FEATURES, SET_MEM_TABLE with NEED_REPLY, then NUM, BASE, ADDR and KICK
  per ring, then SET_VRING_ENABLE 1 per ring. On exit it sends
  SET_VRING_ENABLE 0 and GET_VRING_BASE per ring.
"""

from .adapter import VhostUserDevice
from .errors import VhostUserError
from .server import VhostUserServer
from .session import DEFAULT_PROTOCOL_FEATURES, SUPPORTED_PROTOCOL_FEATURES, Session

__all__ = [
    "DEFAULT_PROTOCOL_FEATURES",
    "SUPPORTED_PROTOCOL_FEATURES",
    "Session",
    "VhostUserDevice",
    "VhostUserError",
    "VhostUserServer",
]
