"""The lab: a hardware-assisted KVM on any x86-64 Linux host, one level down.

QEMU's software emulator (TCG) with ``-cpu max`` offers an AMD CPU with SVM and nested
paging; Debian's packaged kernel booted there loads kvm_amd, and the L1 guest has a
/dev/kvm with hardware assists (emulated, so slow, but the real VMX/SVM code paths of
KVM, not PVM's). ``lab.run(["cmd", ...])`` runs a command there, chrooted into this
host's root file system (read-only over 9p), and returns its status and output;
``lab/run`` is the same from a shell. See lab/README.md and docs/lab.md.

This is test infrastructure, not part of the installed corevisor package: it lives in
the repository and uses corevisor only for its cpio writer.
"""

from __future__ import annotations

import sys

from lab.pycache import REPO

if str(REPO / "src") not in sys.path:  # corevisor's cpio writer, without the venv
    sys.path.append(str(REPO / "src"))

from lab.vm import Exit, LabError, LabResult, cache_dir, run  # noqa: E402

__all__ = ["run", "LabResult", "LabError", "Exit", "cache_dir"]
