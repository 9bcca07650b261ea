"""A packet socket on the host side of a TAP that records the frames the kernel receives.

The kernel strips an 802.1Q or 802.1ad tag into the skb before packet
sockets see a frame (skb_vlan_untag) and reports it in the PACKET_AUXDATA
control message. ``HostCapture`` puts the tag back, so each frame reads as
the device wrote it.
"""

from __future__ import annotations

import errno
import socket
import struct

from backends import enter_namespace

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40
SO_RCVBUFFORCE = 33  # Linux asm-generic/socket.h
_AUXDATA = struct.Struct("=IIIHHHH")
_STATISTICS = struct.Struct("=II")
MAX_FRAME = 70_000


class HostCapture:
    """Frames arriving at interface ``ifname`` of namespace ``netns``, in order."""

    def __init__(self, netns: str, ifname: str, buffer_bytes: int = 256 << 20) -> None:
        with enter_namespace(netns):
            self.sock = socket.socket(
                socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)
            )
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, buffer_bytes)
            self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            self.sock.bind((ifname, 0))
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    def drain(self) -> list[bytes]:
        """Return every frame received since the last call, tags restored."""
        frames = []
        space = socket.CMSG_SPACE(_AUXDATA.size)
        while True:
            try:
                data, ancillary, _flags, address = self.sock.recvmsg(MAX_FRAME, space)
            except BlockingIOError:
                return frames
            except OSError as exc:
                # The socket reports a TAP whose last file descriptor closed
                # once with ENETDOWN; the frames queued before stay readable.
                if exc.errno != errno.ENETDOWN:
                    raise
                continue
            if address[2] == PACKET_OUTGOING:
                continue
            frames.append(_restore_tag(data, ancillary))

    def drops(self) -> int:
        """Return the frames the socket dropped since the last call."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATISTICS.size)
        return _STATISTICS.unpack(raw)[1]

    def close(self) -> None:
        self.sock.close()


def _restore_tag(data: bytes, ancillary: list) -> bytes:
    for level, kind, payload in ancillary:
        if level != SOL_PACKET or kind != PACKET_AUXDATA:
            continue
        status, *_, tci, tpid = _AUXDATA.unpack(payload[: _AUXDATA.size])
        if not status & TP_STATUS_VLAN_VALID:
            continue
        if not status & TP_STATUS_VLAN_TPID_VALID:
            tpid = 0x8100
        return data[:12] + struct.pack("!HH", tpid, tci) + data[12:]
    return data
