"""Configuration of the guest driver model, and the features it accepts.

``GuestConfig`` picks the Linux behaviour the model follows: the TX variant,
the receive buffer mode, which optional features it requests, and the driver
constants. ``negotiate`` turns a device offer into the accepted feature set,
as ``virtnet_probe`` does: the driver accepts the features it knows and wants
that the device offered (virtio 1.2, 3.1.1).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from virtio import VirtioFeature

from ..features import NetFeature
from .costs import CostModel

__all__ = [
    "TxVariant",
    "RxMode",
    "GuestConfig",
    "negotiate",
    "DEFAULT_MAX_SKB_FRAGS",
    "GOOD_PACKET_LEN",
    "MERGEABLE_BUFFER_LEN",
    "PAGE_SIZE",
    "NAPI_WEIGHT",
]

DEFAULT_MAX_SKB_FRAGS = 18
"""MAX_SKB_FRAGS of the guest kernel: 65536 / PAGE_SIZE + 2 with 4 KiB pages.
Kernels before 6.2 had 17; the stop threshold is 2 + MAX_SKB_FRAGS."""
GOOD_PACKET_LEN = 1518
"""Frame room of a small receive buffer: ETH_HLEN + VLAN_HLEN + ETH_DATA_LEN."""
MERGEABLE_BUFFER_LEN = 1536
"""Size of one mergeable receive buffer (Linux's fixed size before it sized
them from an average of received lengths)."""
PAGE_SIZE = 4096
NAPI_WEIGHT = 64
"""NAPI_POLL_WEIGHT: frames one NAPI poll may handle."""
QDISC_LIMIT = 1000
"""Default txqueuelen of a Linux network device."""
CONTROL_QUEUE_SIZE = 64
BULK_LIMIT = 16
"""Packets per qdisc bulk dequeue. Linux bounds a bulk by BQL's byte limit,
which adapts at run time; this fixed count is an estimate of it."""


class TxVariant(enum.StrEnum):
    """The Linux TX path the model runs.

    ``classic`` is the start_xmit of the 23-step table (Linux 3.x to 4.x
    without TX NAPI): it reclaims only inside start_xmit and kicks for every
    packet. ``napi`` is today's path: TX NAPI, xmit_more batching of kicks and
    check_sq_full_and_disable.
    """

    CLASSIC = "classic"
    NAPI = "napi"


class RxMode(enum.StrEnum):
    """Receive buffer layout the driver posts (``virtnet_probe`` picks one)."""

    SMALL = "small"
    BIG = "big"
    MERGEABLE = "mergeable"


@dataclass(frozen=True)
class GuestConfig:
    """Choices of the guest driver model.

    ``event_idx``, ``indirect``, ``ctrl_vq`` and ``version_1`` ask for the
    features of those names; the model uses them only when the device offers
    them. ``rx_mode`` "mergeable" requests MRG_RXBUF and falls back to
    "small" without it. ``can_push`` puts the header in the same buffer as
    the frame (one descriptor); None means Linux's rule, which pushes when
    ANY_LAYOUT or VERSION_1 is negotiated. ``tx_max_frame`` sizes the TX
    packet buffers, so longer frames are rejected by ``send``.
    """

    variant: TxVariant | str = TxVariant.NAPI
    queue_size: int = 256
    rx_queue_size: int | None = None
    rx_mode: RxMode | str = RxMode.MERGEABLE
    event_idx: bool = True
    indirect: bool = True
    ctrl_vq: bool = True
    version_1: bool = True
    max_skb_frags: int = DEFAULT_MAX_SKB_FRAGS
    can_push: bool | None = None
    napi_weight: int = NAPI_WEIGHT
    qdisc_limit: int = QDISC_LIMIT
    bulk_limit: int = BULK_LIMIT
    """Packets the qdisc hands over in one batch, all but the last with
    xmit_more; 1 turns xmit_more off."""
    tx_max_frame: int = GOOD_PACKET_LEN
    rx_cleans_tx: bool = True
    """Let the RX NAPI poll reclaim TX buffers (virtnet_poll_cleantx), napi only."""
    scratch_bytes: int = 0x20000
    """Guest memory set aside for tests that write raw chains."""
    costs: CostModel = field(default_factory=CostModel)

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", TxVariant(self.variant))
        object.__setattr__(self, "rx_mode", RxMode(self.rx_mode))
        if self.max_skb_frags < 0:
            raise ValueError(
                f"max_skb_frags {self.max_skb_frags} is invalid: use 0 or more"
            )
        if self.queue_size < self.stop_threshold:
            # After a full reclaim num_free would still be below the threshold,
            # so the queue would stop after its first packet and never restart.
            raise ValueError(
                f"queue_size {self.queue_size} is below 2 + max_skb_frags"
                f" ({self.stop_threshold}): use a larger queue or fewer frags"
            )
        if self.napi_weight < 1:
            raise ValueError(
                f"napi_weight {self.napi_weight} is invalid: use 1 or more"
            )
        if self.bulk_limit < 1:
            raise ValueError(f"bulk_limit {self.bulk_limit} is invalid: use 1 or more")
        if self.qdisc_limit < 1:
            raise ValueError(
                f"qdisc_limit {self.qdisc_limit} is invalid: use 1 or more"
            )
        if not 1 <= self.tx_max_frame <= 65550:
            raise ValueError(
                f"tx_max_frame {self.tx_max_frame} is invalid: use 1 to 65550"
            )

    @property
    def stop_threshold(self) -> int:
        """Free descriptors below which start_xmit stops the queue."""
        return 2 + self.max_skb_frags

    @property
    def rx_size(self) -> int:
        return self.rx_queue_size or self.queue_size


_CONTROL_FEATURES = (
    NetFeature.CTRL_VQ
    | NetFeature.CTRL_RX
    | NetFeature.CTRL_VLAN
    | NetFeature.CTRL_MAC_ADDR
    | NetFeature.GUEST_ANNOUNCE
)
_ALWAYS = NetFeature.MAC | NetFeature.STATUS | NetFeature.MTU | VirtioFeature.ANY_LAYOUT


def negotiate(offered: int, config: GuestConfig) -> int:
    """Return the features the driver accepts from ``offered``.

    No checksum or segmentation offload is accepted: the model sends and
    receives plain frames with a zero header.
    """
    requested = int(_ALWAYS)
    if config.version_1:
        requested |= VirtioFeature.VERSION_1
    if config.event_idx:
        requested |= VirtioFeature.EVENT_IDX
    if config.indirect:
        requested |= VirtioFeature.INDIRECT_DESC
    if config.rx_mode is RxMode.MERGEABLE:
        requested |= NetFeature.MRG_RXBUF
    if config.ctrl_vq:
        requested |= _CONTROL_FEATURES
    accepted = offered & requested
    if not accepted & NetFeature.CTRL_VQ:
        accepted &= ~_CONTROL_FEATURES
    return accepted
