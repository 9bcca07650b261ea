"""The device status state machine (2.1, 3.1) and feature validation (2.2)."""

from __future__ import annotations

import pytest

from virtio import (
    DeviceStatus,
    FeatureError,
    StatusRegister,
    StatusTransitionError,
    VirtioFeature,
    validate_features,
)
from virtio.features import bits

ACK = DeviceStatus.ACKNOWLEDGE
DRIVER = DeviceStatus.DRIVER
FEATURES_OK = DeviceStatus.FEATURES_OK
DRIVER_OK = DeviceStatus.DRIVER_OK
NEEDS_RESET = DeviceStatus.DEVICE_NEEDS_RESET
FAILED = DeviceStatus.FAILED


def test_legal_modern_sequence() -> None:
    status = StatusRegister()

    assert status.write(ACK) == ACK
    assert status.write(ACK | DRIVER) == ACK | DRIVER
    assert status.write(ACK | DRIVER | FEATURES_OK) == ACK | DRIVER | FEATURES_OK
    assert status.write(ACK | DRIVER | FEATURES_OK | DRIVER_OK) == 0x0F
    assert status.driver_ok is True
    assert status.needs_reset is False


def test_legal_legacy_sequence_without_features_ok() -> None:
    status = StatusRegister()

    status.write(ACK, modern=False)
    status.write(ACK | DRIVER, modern=False)

    assert status.write(ACK | DRIVER | DRIVER_OK, modern=False) == 0x07


def test_several_bits_in_one_write() -> None:
    status = StatusRegister()

    assert status.write(ACK | DRIVER | FEATURES_OK) == 0x0B


@pytest.mark.parametrize(
    ("current", "requested", "reason"),
    [
        (0x00, DRIVER, "DRIVER needs"),
        (0x00, FEATURES_OK, "FEATURES_OK needs"),
        (0x01, ACK | FEATURES_OK, "FEATURES_OK needs"),
        (0x03, ACK | DRIVER | DRIVER_OK, "DRIVER_OK needs"),
        (0x0B, ACK | DRIVER, "can only be cleared by writing 0"),
        (0x03, ACK, "can only be cleared by writing 0"),
        (0x03, ACK | DRIVER | NEEDS_RESET, "DEVICE_NEEDS_RESET is set by the device"),
        (0x01, ACK | 0x10, "unknown bits 0x10"),
        (0x01, ACK | 0x20, "unknown bits 0x20"),
        (0x01, 0x101, "unknown bits 0x100"),
    ],
)
def test_illegal_transitions_rejected(
    current: int, requested: int, reason: str
) -> None:
    status = StatusRegister()
    if current:
        status.write(current)

    with pytest.raises(StatusTransitionError, match=reason) as caught:
        status.write(requested)

    assert caught.value.current == current
    assert caught.value.requested == requested
    assert f"from {current:#04x} to {requested:#04x}" in str(caught.value)
    assert status.value == current


def test_features_ok_refused_when_validation_fails() -> None:
    status = StatusRegister()
    status.write(ACK | DRIVER)

    def reject() -> None:
        raise FeatureError(0x1, "bit 0 requires bits [1]")

    result = status.write(ACK | DRIVER | FEATURES_OK, validate_features=reject)

    assert result == ACK | DRIVER
    assert not status.value & FEATURES_OK  # the driver reads it back clear


def test_features_ok_accepted_when_validation_passes() -> None:
    status = StatusRegister()
    status.write(ACK | DRIVER)
    calls = []

    status.write(ACK | DRIVER | FEATURES_OK, validate_features=lambda: calls.append(1))
    status.write(
        ACK | DRIVER | FEATURES_OK | DRIVER_OK,
        validate_features=lambda: calls.append(2),
    )

    assert calls == [1]  # only the write that adds FEATURES_OK validates
    assert status.driver_ok


def test_driver_ok_after_refused_features_rejected() -> None:
    status = StatusRegister()
    status.write(ACK | DRIVER)

    def reject() -> None:
        raise FeatureError(0x1, "refused")

    status.write(ACK | DRIVER | FEATURES_OK, validate_features=reject)

    with pytest.raises(StatusTransitionError, match="DRIVER_OK needs FEATURES_OK"):
        status.write(ACK | DRIVER | FEATURES_OK | DRIVER_OK, validate_features=reject)
    with pytest.raises(StatusTransitionError, match="DRIVER_OK needs"):
        status.write(ACK | DRIVER | DRIVER_OK)
    assert status.value == ACK | DRIVER


def test_validation_errors_other_than_feature_error_propagate() -> None:
    status = StatusRegister()
    status.write(ACK | DRIVER)

    def broken() -> None:
        raise RuntimeError("bug in the callback")

    with pytest.raises(RuntimeError):
        status.write(ACK | DRIVER | FEATURES_OK, validate_features=broken)
    assert status.value == ACK | DRIVER


@pytest.mark.parametrize("current", [0x01, 0x03, 0x0B, 0x0F, 0x8F])
def test_write_zero_resets(current: int) -> None:
    status = StatusRegister()
    status.write(current & ~FAILED if current & FAILED else current)
    if current & FAILED:
        status.write(current)

    assert status.write(0) == 0
    assert status.value == 0
    assert status.driver_ok is False


def test_failed_can_be_set_any_time() -> None:
    status = StatusRegister()
    status.write(ACK)

    assert status.write(ACK | FAILED) == ACK | FAILED


def test_device_needs_reset_set_by_device_only() -> None:
    status = StatusRegister()
    status.write(0x0F)

    assert status.set_needs_reset() is True
    assert status.set_needs_reset() is False
    assert status.needs_reset
    # The driver may write the value back, with or without the bit; the
    # device keeps it until reset.
    assert status.write(0x0F | NEEDS_RESET) == 0x0F | NEEDS_RESET
    assert status.write(0x0F) == 0x0F | NEEDS_RESET
    assert status.write(0) == 0
    assert status.needs_reset is False


# -- feature validation -------------------------------------------------------------------


def test_features_subset_of_offer_accepted() -> None:
    offered = (
        VirtioFeature.VERSION_1 | VirtioFeature.EVENT_IDX | VirtioFeature.INDIRECT_DESC
    )

    validate_features(offered, VirtioFeature.VERSION_1 | VirtioFeature.EVENT_IDX)
    validate_features(offered, 0)


def test_feature_not_offered_rejected() -> None:
    offered = VirtioFeature.VERSION_1

    with pytest.raises(FeatureError, match=r"bits \[29\] were not offered") as caught:
        validate_features(offered, VirtioFeature.VERSION_1 | VirtioFeature.EVENT_IDX)

    assert caught.value.features == VirtioFeature.VERSION_1 | VirtioFeature.EVENT_IDX


def test_feature_dependency_missing_rejected() -> None:
    # A device-specific rule: bit 5 needs bits 0 and 1.
    dependencies = {1 << 5: (1 << 0) | (1 << 1)}
    offered = (1 << 0) | (1 << 1) | (1 << 5)

    validate_features(offered, offered, dependencies)
    with pytest.raises(FeatureError, match=r"bit 5 requires bits \[0, 1\]") as caught:
        validate_features(offered, (1 << 0) | (1 << 5), dependencies)

    assert caught.value.features == (1 << 0) | (1 << 5)


def test_feature_dependency_alternatives() -> None:
    # Bit 5 needs bit 0 or bit 1; either one satisfies it.
    dependencies = {1 << 5: (1 << 0, 1 << 1)}
    offered = (1 << 0) | (1 << 1) | (1 << 5)

    validate_features(offered, (1 << 0) | (1 << 5), dependencies)
    validate_features(offered, (1 << 1) | (1 << 5), dependencies)
    with pytest.raises(FeatureError, match=r"bit 5 requires bits \[0\] or \[1\]"):
        validate_features(offered, 1 << 5, dependencies)


def test_feature_bit_numbers() -> None:
    assert VirtioFeature.INDIRECT_DESC == 1 << 28
    assert VirtioFeature.EVENT_IDX == 1 << 29
    assert VirtioFeature.VERSION_1 == 1 << 32
    assert bits((1 << 29) | (1 << 32) | 1) == [0, 29, 32]
    assert bits(0) == []
