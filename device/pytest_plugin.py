"""pytest plugin of virtio-net-emu: the ``fake_nic`` fixture."""
