"""The public API of the backends package."""

from __future__ import annotations

import importlib
import inspect

import backends

MODULES = ["base", "errors", "loopback", "netns", "pcap", "pcapng", "tap"]


def public_names(namespace: object) -> set[str]:
    return {
        name
        for name, value in vars(namespace).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }


def test_package_all_matches_public_names() -> None:
    expected = public_names(backends)

    assert sorted(backends.__all__) == sorted(expected)


def test_package_all_names_resolve() -> None:
    for name in backends.__all__:
        assert hasattr(backends, name), name


def test_module_all_names_resolve() -> None:
    for module_name in MODULES:
        module = importlib.import_module(f"backends.{module_name}")
        for name in module.__all__:
            assert hasattr(module, name), f"backends.{module_name}.{name}"


def test_package_exports_backends() -> None:
    for name in ("TapBackend", "PcapBackend", "LoopbackBackend", "NullBackend"):
        assert issubclass(getattr(backends, name), backends.Backend), name
