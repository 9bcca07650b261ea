"""Probe of the guest driver model: features, status, memory layout, config."""

from __future__ import annotations

import pytest

from device.features import DEFAULT_OFFER, NetFeature
from device.guest import (
    BumpAllocator,
    CostModel,
    GuestConfig,
    ProbeError,
    RxMode,
    SlotPool,
    TxVariant,
    negotiate,
)
from device.machine import CTRL_QUEUE, RX_QUEUE, TX_QUEUE, Machine
from virtio import DeviceStatus, VirtioFeature


def test_negotiate_takes_only_offered_features() -> None:
    config = GuestConfig()
    offered = VirtioFeature.VERSION_1 | NetFeature.MAC
    accepted = negotiate(offered, config)
    assert accepted == offered


def test_negotiate_follows_the_chosen_set() -> None:
    config = GuestConfig(
        event_idx=False, indirect=False, rx_mode="small", ctrl_vq=False
    )
    accepted = negotiate(DEFAULT_OFFER, config)
    assert not accepted & VirtioFeature.EVENT_IDX
    assert not accepted & VirtioFeature.INDIRECT_DESC
    assert not accepted & NetFeature.MRG_RXBUF
    assert not accepted & NetFeature.CTRL_VQ
    assert not accepted & NetFeature.CTRL_RX
    assert accepted & VirtioFeature.VERSION_1


def test_negotiate_drops_control_features_without_ctrl_vq() -> None:
    offered = DEFAULT_OFFER & ~NetFeature.CTRL_VQ
    accepted = negotiate(offered, GuestConfig())
    assert not accepted & (NetFeature.CTRL_RX | NetFeature.CTRL_VLAN)


def test_probe_reaches_driver_ok() -> None:
    machine = Machine()
    status = machine.device.status.value
    assert status & DeviceStatus.DRIVER_OK
    assert status & DeviceStatus.FEATURES_OK
    assert machine.device.negotiated == machine.guest.features
    assert set(machine.device.queues) == {RX_QUEUE, TX_QUEUE, CTRL_QUEUE}


def test_probe_without_ctrl_vq_has_two_queues() -> None:
    machine = Machine(guest=GuestConfig(ctrl_vq=False))
    assert set(machine.device.queues) == {RX_QUEUE, TX_QUEUE}
    assert machine.control is None


def test_probe_falls_back_to_small_buffers_without_mrg_rxbuf() -> None:
    offered = DEFAULT_OFFER & ~NetFeature.MRG_RXBUF
    machine = Machine(offered=offered)
    assert machine.guest.rx_mode is RxMode.SMALL


def test_legacy_driver_uses_a_10_byte_header() -> None:
    machine = Machine(guest=GuestConfig(version_1=False, rx_mode="small"))
    assert machine.guest.header_len == 10
    assert machine.device.header_len == 10


def test_probe_lays_out_disjoint_areas_inside_memory() -> None:
    machine = Machine(guest=GuestConfig(rx_mode="big"))
    plan = machine.guest.plan
    areas = [
        (plan.rx_ring.desc, plan.rx_ring.end),
        (plan.tx_ring.desc, plan.tx_ring.end),
        (plan.control_ring.desc, plan.control_ring.end),
        (plan.tx_pool.base, plan.tx_pool.base + plan.tx_pool.slot_size * 256),
        (plan.rx_pool.base, plan.rx_pool.base + plan.rx_pool.slot_size * 256),
        (plan.scratch, plan.scratch + plan.scratch_bytes),
    ]
    areas.sort()
    for (_, end), (start, _) in zip(areas, areas[1:]):
        assert end <= start
    assert machine.guest.memory.size >= plan.end


def test_probe_fills_the_receive_ring() -> None:
    machine = Machine(guest=GuestConfig(queue_size=64))
    assert machine.guest.queues[RX_QUEUE].num_free == 0
    assert machine.guest.stats.rx_buffers_posted == 64


def test_big_buffers_need_indirect_or_a_large_ring() -> None:
    config = GuestConfig(rx_queue_size=16, rx_mode="big", indirect=False)
    with pytest.raises(ProbeError, match="18 descriptors"):
        Machine(guest=config)


def test_big_buffers_without_indirect_post_whole_chains() -> None:
    machine = Machine(guest=GuestConfig(queue_size=64, rx_mode="big", indirect=False))
    queue = machine.guest.queues[RX_QUEUE]
    assert machine.guest.stats.rx_buffers_posted == 3
    assert queue.num_free == 64 - 3 * 18


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="max_skb_frags -1"):
        GuestConfig(max_skb_frags=-1)
    with pytest.raises(ValueError, match="tx_max_frame 0"):
        GuestConfig(tx_max_frame=0)
    with pytest.raises(ValueError):
        GuestConfig(variant="fast")
    with pytest.raises(ValueError, match="cost xmit_skb=-5"):
        CostModel(xmit_skb=-5)


def test_config_stop_threshold_is_two_plus_frags() -> None:
    assert GuestConfig().stop_threshold == 20
    assert GuestConfig(max_skb_frags=17).stop_threshold == 19
    assert GuestConfig(variant="classic").variant is TxVariant.CLASSIC


def test_free_cost_model_is_all_zero() -> None:
    costs = CostModel.free()
    assert costs.xmit_skb == 0
    assert costs.hardirq == 0


def test_bump_allocator_aligns_and_grows() -> None:
    allocator = BumpAllocator(0x1000)
    first = allocator.allocate(10, 16)
    second = allocator.allocate(4, 4096)
    assert first == 0x1000
    assert second == 0x2000
    assert allocator.top == 0x2004
    with pytest.raises(ValueError, match="power of two"):
        allocator.allocate(1, 3)


def test_slot_pool_hands_out_each_slot_once() -> None:
    pool = SlotPool.allocate(BumpAllocator(0x1000), 100, 3)
    slots = [pool.take() for _ in range(3)]
    assert sorted(slots) == [0, 1, 2]
    assert pool.take() is None
    pool.give_back(1)
    assert pool.take() == 1
    assert pool.address(1) - pool.address(0) == pool.slot_size
    assert pool.slot_size >= 100
