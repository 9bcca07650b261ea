"""``python -m device`` runs the ``virtio-net-emu`` command line."""

import sys

from device.cli import main

sys.exit(main())
