"""The virtio-net device, its TX policies, notifiers, clocks and guest model."""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
