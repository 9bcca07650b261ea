"""Coverage-guided fuzzing of the whole device with atheris.

Each input is decoded by ``device_decoder.decode`` into a case and replayed
with the invariant checker after every step. A violation or an unexpected
exception is a crash, and atheris saves its input as ``crash-*``. Turn a saved input
into a replayable case with ``python fuzz/device_decoder.py crash-... >
fuzz/corpus/device/NAME.json``.

Usage: ``python fuzz/atheris_device.py [libFuzzer options] [CORPUS_DIR]``,
for example ``-atheris_runs=100000`` or ``-max_total_time=600``. Exits with
a message when atheris is not installed (``pip install atheris``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

try:
    import atheris
except ImportError:  # pragma: no cover - depends on the environment
    atheris = None


def main() -> int:
    if atheris is None:
        print("atheris is not installed: pip install atheris", file=sys.stderr)
        return 2
    with atheris.instrument_imports():
        from device_decoder import check, decode

        import device.case  # noqa: F401
        import device.case_check  # noqa: F401
        import device.net_device  # noqa: F401
        import device.rx  # noqa: F401
        import device.tx  # noqa: F401
        import virtio.device_queue  # noqa: F401

    logging.disable(logging.ERROR)

    def test_one_input(data: bytes) -> None:
        violations = check(decode(data))
        if violations:
            raise AssertionError("; ".join(violations[:3]))

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
