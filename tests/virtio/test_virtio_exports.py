"""The virtio package's public names and its sans-IO import rule."""

from __future__ import annotations

import ast
from pathlib import Path

import virtio

PACKAGE_DIR = Path(virtio.__file__).parent
FORBIDDEN_MODULES = {
    "socket",
    "select",
    "selectors",
    "fcntl",
    "asyncio",
    "threading",
    "time",
}


def test_all_names_exist() -> None:
    missing = [name for name in virtio.__all__ if not hasattr(virtio, name)]

    assert missing == []
    assert len(virtio.__all__) == len(set(virtio.__all__))


def test_public_names_are_in_all() -> None:
    public = {
        name
        for name, value in vars(virtio).items()
        if not name.startswith("_") and not type(value).__name__ == "module"
    }

    assert public - {"logging"} == set(virtio.__all__)


def test_star_import_matches_all() -> None:
    namespace: dict = {}
    exec("from virtio import *", namespace)  # noqa: S102 - the behaviour under test

    assert set(namespace) - {"__builtins__"} == set(virtio.__all__)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__"
        ):
            found.add("__import__")
    return found


def test_package_imports_no_io_or_clock_modules() -> None:
    sources = sorted(PACKAGE_DIR.glob("*.py"))
    assert sources, f"no sources under {PACKAGE_DIR}"

    offenders = {
        path.name: sorted(imported_modules(path) & (FORBIDDEN_MODULES | {"__import__"}))
        for path in sources
    }

    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_import_scanner_finds_forbidden_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os, time\nfrom asyncio import sleep\nimport select as s\n"
    )

    assert imported_modules(sample) & FORBIDDEN_MODULES == {"time", "asyncio", "select"}
