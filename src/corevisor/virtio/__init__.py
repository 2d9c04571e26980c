"""Paravirtual I/O: virtio 1.x devices on the virtio-mmio transport (convention 6).

Three layers, each testable without the others: queue.py (split virtqueues over
GuestMemory, hostile-guest proof), device.py (what every device type shares) with the
types blk.py, net.py, console.py, rng.py, and mmio.py (the version-2 register
transport). worker.py runs each device's host-side work on an I/O thread of its own;
config.py holds the rules for the backends a user names (disk image, TAP name);
attach.py places the devices in a VM (MMIO windows, GSIs, ioeventfds, irqfds, the guest
command line, ACPI).

Nothing is imported here, so the config readers that use config.py stay cheap.
"""
