"""Real-guest tests: a Linux guest under QEMU (TCG) whose virtio_net driver
talks to QEMU's built-in virtio-net on a TAP or to a vhost-user backend.

build_image.py builds the kernel and initramfs, qemu.py boots them, netns.py
sets up the host side and measure.py records baseline figures as JSON. The
modules import each other relatively, so they work both as ``tests.guest``
(``python -m tests.guest.measure`` from the repository root) and as the
``guest`` package that pytest imports from ``tests/``.
"""
