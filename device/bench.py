"""``virtio-net-emu bench``: throughput measured as ratios within one run.

The machine this runs on may be shared and noisy, so every benchmark runs
the project's path next to a reference in the same process and reports the
ratio; absolute rates are printed too, but only the ratios compare across
runs. Each target lives in its own module and is imported only when used.
"""

from __future__ import annotations

import argparse
import json

from .cli import UserError

__all__ = ["command"]


def _run(target: str, seconds: float) -> dict:
    if target == "ring":
        from .bench_ring import bench_ring

        return bench_ring(seconds=seconds)
    if target == "tap":
        from .bench_tap import bench_tap

        return bench_tap(seconds=seconds)
    if target == "vhost-user":
        from .bench_vhost_user import bench_vhost_user

        return bench_vhost_user(seconds=seconds)
    raise UserError(f"unknown benchmark {target!r}: use ring, tap or vhost-user")


def _print_text(target: str, result: dict) -> None:
    print(f"bench {target}:")
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"  {key}:")
            for inner, figure in value.items():
                print(f"    {inner}: {figure}")
        else:
            print(f"  {key}: {value}")


def command(args: argparse.Namespace) -> int:
    result = _run(args.target, args.seconds)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        _print_text(args.target, result)
    return 0
