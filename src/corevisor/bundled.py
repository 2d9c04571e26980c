"""The bundled guests: where their sources and built images are, and building them.

The guests' sources live in the repository's guests/ directory and are built there by
its Makefile (gcc + binutils), so every image shipped has its source beside it. The
images are found relative to this package, which works for the editable install the
README sets up.
"""

from __future__ import annotations

from pathlib import Path

from corevisor.errors import CorevisorError

GUESTS_DIR = Path(__file__).resolve().parents[2] / "guests"
BUILD_DIR = GUESTS_DIR / "build"
# `corevisor run` with no target: two partitions (rtos, peer) talking over a channel.
DEMO_SYSTEM = GUESTS_DIR.parent / "examples" / "demo.toml"
DEMO_GUESTS = ("rtos", "peer")

# name -> what it shows; the order is the order `corevisor guests` lists them in.
GUESTS = {
    "hello": "prints a greeting, its command line, CPU count and RAM; exits with exit=N",
    "hello-mb": "hello as a multiboot-only ELF32 image",
    "fwcfg": "reads fw_cfg by port and by DMA (CPUs, RAM, etc/e820); PM timer rate vs TSC",
    "fwcfg-mb": "fwcfg as a multiboot-only ELF32 image",
    "smp": "starts every CPU with INIT/SIPI; each checks in",
    "timer": "LAPIC timer ticks interrupting a user-mode loop; UART interrupt check",
    "fault": "triple-faults on purpose",
    "sensor": "drives the example user device (examples/sensor.py): reads it, takes its "
    "alarm interrupt count=N times",
    "pcisensor": "drives the example PCI user device (examples/pcisensor.py): finds it on "
    "PCI bus 0, reads its BARs, takes its INTx (or irq=msi) count=N times",
    "pio": "count=N port writes from user mode (benchmark guest)",
    "ptstress": "benchmark: page-table stress, map/touch/unmap and CR3 switches "
    "(pages=N spaces=N iters=N pattern=seq|rand|shared)",
    "rtos": "preemptive RTOS: pings a peer partition over a channel (msgs=N wdfail=1 crash=1)",
    "peer": "bare-metal peer partition: mode=pong|echo|sink|counter|writer|reader|rowriter",
    "blk": "virtio-blk driver: mode=check (write, flush, verify) or mode=bench seq=1M|rand=4K",
    "net": "virtio-net driver: answers ARP and ping on ip=A.B.C.D for count=N echo requests",
    "rng": "virtio-rng driver: reads 64 random bytes twice, prints them, checks they differ",
    "edu": "drives QEMU's edu device passed through with --vfio: DMA into its RAM, INTx, "
    "MSI, a DMA outside its RAM the IOMMU blocks (outside=ADDR)",
    "dbping": "benchmark: doorbell round trips to a peer (path=kernel|relay); guests/systems",
    "irqlat": "benchmark: LAPIC timer deadline to handler entry latency (wait=hlt|user)",
    "chanbw": "benchmark: byte stream through a channel to a peer in mode=sink",
}


def image_path(name: str) -> Path:
    """Path of a bundled guest's built image (it may not exist yet)."""
    return BUILD_DIR / f"{name}.elf"


def build_guests(quiet: bool = True) -> None:
    """Run the guests' Makefile; raise a one-line error if the toolchain fails."""
    import shutil  # imported here: only building needs them, and start-up time counts
    import subprocess

    if not (GUESTS_DIR / "Makefile").exists():
        raise CorevisorError(f"bundled guest sources not found at {GUESTS_DIR}")
    if shutil.which("make") is None or shutil.which("gcc") is None:
        raise CorevisorError("building the bundled guests needs make and gcc")
    proc = subprocess.run(
        ["make", "-s", "-C", str(GUESTS_DIR)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CorevisorError(f"building the bundled guests failed: {last}")


def ensure_built(name: str) -> Path:
    """Return a bundled guest's image, building the guests first if it is missing."""
    if name not in GUESTS:
        raise CorevisorError(f"no bundled guest named {name!r} (known: {', '.join(GUESTS)})")
    path = image_path(name)
    if not path.exists():
        build_guests()
    if not path.exists():
        raise CorevisorError(f"bundled guest {name!r} was not built at {path}")
    return path
