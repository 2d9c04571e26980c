"""Debian's own Linux kernel on corevisor: the boot protocols, judged by what Linux prints.

On this project's hosts /dev/kvm is PVM without VT-x: every CPL0 instruction is
emulated (~3 M/s) and the emulator lacks some (docs/linux.md, HOST.md). So:

* the vmlinux (PVH) test boots the extracted vmlinux until the emulator gives up, and
  asserts on the early output: banner, our command line, our e820 map, our initrd,
  our ACPI tables, our CPU count; then that corevisor reports the emulation failure as
  a guest-stopped fault (exit status 1). ~45 s.
* the bzImage test proves the 64-bit boot protocol within a bounded time (see it).
* both assert this emulator's limits (its emulation failure, its speed), so they carry
  the ``pvm`` marker and run only where /dev/kvm is PVM. On hardware virtualization
  Linux boots to user space: tests/lab/test_linux.py proves every path there.

The kernel comes from Debian's linux-image-amd64 (scripts/install-system-deps); its
absence fails the tests with that hint rather than skipping them.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from corevisor.arch.x86_64.layout import EBDA_START
from corevisor.loader import identify_image
from corevisor.loader.bzimage import extract_vmlinux, parse_setup_header
from corevisor.loader.initramfs import char_device, directory, write_newc
from tests.kvm.conftest import corevisor

INSTALL_HINT = "run scripts/install-system-deps (needs Debian's linux-image-amd64)"
MEMORY = 256 << 20
CMDLINE = "console=ttyS0 earlyprintk=serial corevisor-test=42"


@pytest.fixture(scope="session")
def bzimage() -> Path:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        pytest.fail(f"no /boot/vmlinuz-*: {INSTALL_HINT}")
    return kernels[-1]


@pytest.fixture(scope="session")
def vmlinux(bzimage: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("linux") / "vmlinux"
    out.write_bytes(extract_vmlinux(bzimage.read_bytes(), str(bzimage)))
    return out


def test_debian_kernel_header_and_extracted_vmlinux(bzimage: Path, vmlinux: Path) -> None:
    data = bzimage.read_bytes()
    hdr = parse_setup_header(data, str(bzimage))
    assert hdr.version >= 0x020C and hdr.relocatable
    assert identify_image(data, "bzImage") == "bzimage"
    assert identify_image(vmlinux.read_bytes(), "vmlinux") == "pvh"


def e820_lines(memory: int) -> list[str]:
    """Our e820 map the way Linux prints it (arch/x86/kernel/e820.c)."""
    spans = [(0, EBDA_START, "usable"), (EBDA_START, 0x100000, "reserved"),
             (0x100000, memory, "usable")]
    return [f"BIOS-e820: [mem {a:#018x}-{b - 1:#018x}] {kind}" for a, b, kind in spans]


@pytest.mark.pvm
def test_vmlinux_pvh_boots_to_the_emulation_limit(vmlinux: Path, tmp_path: Path) -> None:
    """~45 s on a quiet host; the generous timeout is for a loaded one (every CPL0
    instruction is emulated here, so the boot's pace is the host's)."""
    rd = tmp_path / "initrd.cpio"
    rd.write_bytes(write_newc([directory("dev"), char_device("dev/console", 5, 1)]))
    start = time.monotonic()
    r = corevisor(
        "run", "--kernel", str(vmlinux), "--initrd", str(rd), "--cpus", "2",
        "--memory", "256M", "--cmdline", CMDLINE, "--timeout", "300", timeout=360,
    )
    took = time.monotonic() - start
    out = r.stdout
    assert "Linux version 6." in out, r.stderr
    assert f"Command line: {CMDLINE}" in out
    for line in e820_lines(MEMORY):
        assert line in out
    # the initrd is our PVH module, placed page-aligned at the top of RAM
    size = (len(rd.read_bytes()) + 0xFFF) & ~0xFFF
    assert f"RAMDISK: [mem {MEMORY - size:#010x}-{MEMORY - 1:#010x}]" in out
    assert re.search(r"ACPI: RSDP 0x00000000000E0000 \w+ \(v02 CRVSR", out)
    for table in ("XSDT", "FACP", "DSDT", "APIC"):
        assert re.search(rf"ACPI: {table} 0x[0-9A-F]+ .*CRVSR", out), table
    # the FADT is not hardware-reduced: Linux finds its FACS and its PM timer
    facs = re.findall(r"ACPI: FACS 0x00000000000E00[0-9A-F]{2} 000040\b", out)
    assert len(facs) == 1, out
    assert "ACPI: PM-Timer IO Port: 0x608" in out
    assert "ACPI: INT_SRC_OVR (bus 0 bus_irq 9 global_irq 9 high level)" in out
    assert "smpboot: Allowing 2 CPUs, 0 hotplug CPUs" in out
    assert f"Kernel command line: {CMDLINE}" in out
    # ...and then this host's emulator stops it: a clear report, exit status 1
    assert r.returncode == 1, f"after {took:.0f} s: {r.stderr}"
    assert "guest stopped: KVM internal error: emulation failure" in r.stderr
    assert "code at rip:" in r.stderr


@pytest.mark.pvm
def test_bzimage_64bit_boot_protocol_decompresses_our_kernel(
    bzimage: Path, vmlinux: Path
) -> None:
    """The bzImage path, proved from the guest's own progress within ~30 s.

    PVM-only: it catches the decompressor half-way, which on hardware is over before
    the first sample.

    Debian's decompressor prints nothing (CONFIG_X86_VERBOSE_BOOTUP is off) and takes
    far longer than a test may here (measured: ~2 MiB of 65 MiB output in 30 s), so
    instead of waiting for its words we look at what it did, pausing the vCPU:
    * it relocated itself to load address + init_size - its size: it read
      kernel_alignment and init_size from our zero page through rsi;
    * with "nokaslr" it writes the vmlinux at the load address, not at a random
      one: it read our command line through cmd_line_ptr;
    * and what it writes there is the vmlinux, byte for byte: it found the payload.
    """
    from corevisor.builder import build
    from corevisor.config import partition_from_args

    hdr = parse_setup_header(bzimage.read_bytes(), str(bzimage))
    load = 0x100_0000  # pref_address: Debian's kernel is relocatable
    pm_size = bzimage.stat().st_size - hdr.kernel_offset
    head = vmlinux.read_bytes()[: 64 << 10]
    part = partition_from_args(
        str(bzimage), memory="256M", cmdline="console=ttyS0 nokaslr", serial="null"
    )
    m = build(part)
    try:
        m.start()
        deadline = time.monotonic() + 45
        rips = []
        while time.monotonic() < deadline:
            time.sleep(3)
            m.pause()
            assert m.report is None, m.report
            rips.append(m.vcpus[0].fd.get_regs().rip)
            done = m.memory.read(load, len(head)) == head
            m.resume()
            if done:
                break
    finally:
        m.close()
    assert done, f"no vmlinux at {load:#x} after 45 s (rip samples {[hex(r) for r in rips]})"
    assert load + pm_size <= rips[-1] < load + hdr.init_size, hex(rips[-1])
