"""The ``virtio-net-emu`` command line.

Each subcommand lives in its own module and is imported only when used. A
mistake the user can fix (a missing capture, a namespace that does not exist,
no permission for /dev/net/tun) ends with one line on stderr saying what
failed and what to do, and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "UserError", "TX_MODES"]

TX_MODES = ("bh", "timer", "timer-legacy", "immediate")
EXIT_USAGE = 2


class UserError(Exception):
    """A failure the user can fix. The message states what failed and what to do."""


def _add_ring_options(
    parser: argparse.ArgumentParser, scenario_default: bool = False
) -> None:
    # A scenario picks its own TX mode unless one is given: the figure
    # scenario needs a TX timer to run all 23 steps.
    parser.add_argument(
        "--tx-mode",
        choices=TX_MODES,
        default=None if scenario_default else "bh",
        help="TX batching policy of the device (default: "
        + ("the scenario's own" if scenario_default else "bh, QEMU's default")
        + ")",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=256,
        metavar="N",
        help="size of each virtqueue, a power of two up to 32768 (default: 256);"
        " the guest model needs at least 32, since it stops its queue below"
        " 2 + MAX_SKB_FRAGS free descriptors",
    )
    parser.add_argument(
        "--no-event-idx",
        action="store_true",
        help="do not negotiate VIRTIO_F_EVENT_IDX (use the flag encodings)",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtio-net-emu",
        description="A userspace virtio-net device emulator: split virtqueues, "
        "QEMU's TX batching, a Linux driver model, TAP, pcap and vhost-user.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run", help="replay the bundled sample capture into a pcap file (no root)"
    )
    run.add_argument(
        "-o",
        "--output",
        default="virtio-net-emu-run.pcap",
        help="pcap file to write (default: %(default)s in this folder)",
    )
    run.add_argument("--json", action="store_true", help="print one JSON object")
    _add_ring_options(run)

    replay = commands.add_parser(
        "replay", help="send a pcap or pcapng capture through the guest and device"
    )
    replay.add_argument("capture", help="pcap or pcapng file of Ethernet frames")
    replay.add_argument(
        "--to",
        required=True,
        metavar="BACKEND",
        help="pcap:PATH, tap:IFNAME or loopback",
    )
    replay.add_argument("--netns", metavar="NAME", help="network namespace of the TAP")
    pacing = replay.add_mutually_exclusive_group()
    pacing.add_argument(
        "--pace", action="store_true", help="keep the capture's own timing"
    )
    pacing.add_argument(
        "--rate", type=float, metavar="PPS", help="send at this many frames per second"
    )
    replay.add_argument("--json", action="store_true", help="print one JSON object")
    _add_ring_options(replay)

    attach = commands.add_parser("attach", help="run a live fake NIC on a backend")
    attach.add_argument("backend", help="tap:IFNAME or loopback")
    attach.add_argument(
        "--address",
        required=True,
        metavar="ADDR/PREFIX",
        help="the fake NIC's IPv4 address, e.g. 192.0.2.2/24",
    )
    attach.add_argument(
        "--host-address",
        metavar="ADDR/PREFIX",
        help="address to give the host side of a TAP",
    )
    attach.add_argument("--netns", metavar="NAME", help="network namespace of the TAP")
    attach.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="stop after this many seconds (default: until SIGINT)",
    )
    attach.add_argument("--json", action="store_true", help="print one JSON object")
    _add_ring_options(attach)

    bench = commands.add_parser("bench", help="measure throughput as ratios")
    bench.add_argument("target", choices=("ring", "tap", "vhost-user"))
    bench.add_argument(
        "--seconds",
        type=float,
        default=2.0,
        help="time per measurement in seconds (default: 2)",
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object")

    case = commands.add_parser("case", help="replay a virtio-net-case/1 JSON file")
    case.add_argument("file", help="case file")
    case.add_argument("--json", action="store_true", help="print one JSON object")

    step = commands.add_parser("step", help="step through the TX path of a scenario")
    step.add_argument(
        "--scenario",
        default="figure",
        help="figure, saturate, trickle, legacy-stall or a capture file",
    )
    step.add_argument(
        "--rate", type=float, metavar="PPS", help="frame rate for a capture scenario"
    )
    step.add_argument(
        "--break",
        dest="breaks",
        action="append",
        default=[],
        metavar="STEP",
        help="stop at this step number or name, or where a condition becomes true:"
        " num_free<N, timer_armed, notifications_disabled, queue_stopped"
        " (repeatable)",
    )
    step.add_argument(
        "--max-skb-frags",
        type=int,
        default=18,
        metavar="N",
        help="MAX_SKB_FRAGS of the guest model (default: 18)",
    )
    step.add_argument(
        "--script", action="store_true", help="run to the end and print every step"
    )
    step.add_argument(
        "--json",
        action="store_true",
        help="print each step as one JSON object per line",
    )
    _add_ring_options(step, scenario_default=True)

    timeline = commands.add_parser("timeline", help="draw a scenario as a picture")
    timeline.add_argument(
        "--scenario",
        default="figure",
        help="figure, saturate, trickle, legacy-stall or a capture file",
    )
    timeline.add_argument(
        "--rate", type=float, metavar="PPS", help="frame rate for a capture scenario"
    )
    timeline.add_argument(
        "-o",
        "--output",
        required=True,
        help="SVG file, PNG if the name ends in .png, - for text",
    )
    timeline.add_argument(
        "--compare",
        metavar="MODE,MODE",
        help="draw two TX modes side by side, e.g. bh,timer",
    )
    timeline.add_argument(
        "--max-skb-frags",
        type=int,
        default=18,
        metavar="N",
        help="MAX_SKB_FRAGS of the guest model (default: 18)",
    )
    _add_ring_options(timeline, scenario_default=True)

    vhost = commands.add_parser("vhost-user", help="serve a vhost-user frontend")
    vhost.add_argument(
        "--socket", required=True, metavar="PATH", help="Unix socket path to listen on"
    )
    vhost.add_argument(
        "--to", required=True, metavar="BACKEND", help="tap:IFNAME, loopback or null"
    )
    vhost.add_argument("--netns", metavar="NAME", help="network namespace of the TAP")
    vhost.add_argument(
        "--host-address",
        metavar="ADDR/PREFIX",
        help="address to give the host side of the TAP, e.g. 192.0.2.1/24",
    )
    vhost.add_argument("--tx-mode", choices=TX_MODES, default="bh")
    vhost.add_argument(
        "--ring-poll-us",
        type=float,
        default=None,
        metavar="US",
        help="after the TX ring drains, keep notifications off and poll it for"
        " this long, so a transmitting front-end need not kick; 0 turns it off"
        " (default: 2000)",
    )
    vhost.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="stop after this many seconds (default: until SIGINT)",
    )
    vhost.add_argument(
        "--json",
        action="store_true",
        help="print statistics as one JSON object at exit",
    )
    return parser


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """Import the module of one subcommand and return its entry point."""
    if name == "bench":
        from . import bench

        return bench.command
    if name in ("run", "replay"):
        from . import replay

        return replay.run_command if name == "run" else replay.replay_command
    if name == "attach":
        from . import attach

        return attach.command
    if name == "case":
        from . import case

        return lambda args: case.case_command(args.file, args.json)
    if name in ("step", "timeline"):
        from . import stepper, timeline

        return stepper.command if name == "step" else timeline.command
    if name == "vhost-user":
        from .vhost_user import cli as vhost_cli

        return vhost_cli.command
    raise UserError(f"unknown command {name!r}")


def print_json(data: object) -> None:
    """Print one JSON object on one line."""
    print(json.dumps(data, sort_keys=True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="virtio-net-emu: %(levelname)s: %(message)s",
    )
    try:
        return _command(args.command)(args)
    except UserError as error:
        print(f"virtio-net-emu {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (``| head``): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    # Under "python -m device.cli" this file runs as __main__, a second copy
    # of the module; the subcommands raise device.cli.UserError, so run the
    # main of device.cli, which catches that class.
    from device.cli import main as package_main

    sys.exit(package_main())
