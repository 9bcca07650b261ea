"""Coverage-guided fuzzing of the split ring with atheris (libFuzzer for Python).

Each input is decoded by ``ring_decoder.decode`` into a ring case and run by
``run_ring.run_case``. An ``InvariantViolation``, or any other exception, is
a crash, and libFuzzer saves its input as ``crash-<sha1>``. Turn a crash into a
replayed case with::

    python fuzz/ring_decoder.py crash-<sha1> > fuzz/corpus/ring/regression-NAME.json

Run, from the repository root (atheris is optional: ``pip install atheris``)::

    python fuzz/atheris_ring.py -max_total_time=300 -max_len=1024 fuzz/work/

``RING_FUZZ_SKIP_OPS`` (comma-separated device operations, e.g. ``detach``)
makes the runner skip operations whose finding is already known.
"""

from __future__ import annotations

import os
import sys

import atheris

with atheris.instrument_imports():
    from ring_decoder import decode
    from run_ring import run_case

    import virtio  # noqa: F401 - instrumented for coverage feedback

SKIP_OPS = frozenset(filter(None, os.environ.get("RING_FUZZ_SKIP_OPS", "").split(",")))


def test_one_input(data: bytes) -> None:
    """Decode ``data`` and run it; anything but a clean run is a crash.

    A ``CaseError`` is a crash too: the decoder must only build valid cases.
    """
    run_case(decode(data), skip_ops=SKIP_OPS)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
