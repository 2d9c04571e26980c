"""PCI: the host bridge, configuration space, BARs, capabilities, MSI and MSI-X.

Register logic first, as the devices are (devices/__init__.py: pure, never raising on
guest input, save()/restore()):

- config.py: one function's configuration space — the type-0 header, which bits the
  guest may write, BAR sizing and the windows the BARs decode, the capability list;
- msix.py, msi.py: the MSI-X table and pending bits, the MSI capability — masking and
  pending honoured, delivery through a callback;
- host.py: bus 0 of functions, the configuration mechanisms (ports 0xCF8/0xCFC and
  ECAM), and the host bridge function itself (an i440FX, with its PAM registers).

Then what ties them to a VM (the only modules here that issue ioctls): routing.py (the
KVM GSI routing table with one MSI route per vector in use) and platform.py (BAR
placement from the machine's resource map, and moving bus mappings and ioeventfds
when the guest moves a BAR). Which addresses, ports and GSIs the bus uses is
arch/x86_64/layout.py and resources.py; what the guest is told about them is acpi.py,
aml.py and mptable.py. A passed-through host device is a function here too, built in
corevisor/vfio/ (its own package: host checks, the VFIO fds, config virtualisation).
"""
