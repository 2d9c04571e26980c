"""GDB's view of an x86-64 vCPU: register numbering, the target description, packing.

The register list below *is* the layout of the g/G packets and the numbering of p/P:
GDB learns it from the target description (qXfer:features:read:target.xml) generated
from the same list, so the two cannot drift apart. Features: org.gnu.gdb.i386.core and
.sse (what GDB's amd64 support requires), .segments (fs_base, gs_base) and a custom
org.corevisor.sys with the control registers and EFER, which GDB shows as $cr0 ...
$efer and in `info all-registers`.

Values travel between KVM's structures (kvm_regs, kvm_sregs, kvm_fpu) and GDB's
little-endian byte strings here; nothing in this file issues an ioctl.
"""

from __future__ import annotations

from dataclasses import dataclass

from corevisor.kvm import bindings as b

CORE = "org.gnu.gdb.i386.core"
SSE = "org.gnu.gdb.i386.sse"
SEGMENTS = "org.gnu.gdb.i386.segments"
SYS = "org.corevisor.sys"


@dataclass(frozen=True)
class Register:
    """One GDB register: its name, width, GDB type, group and feature."""

    name: str
    bits: int
    type: str
    feature: str
    group: str | None = None

    @property
    def size(self) -> int:
        return self.bits // 8


_GP = "rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15".split()
SEGMENT_NAMES = ("cs", "ss", "ds", "es", "fs", "gs")
_FPU_CTRL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
CONTROL_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")

REGISTERS: tuple[Register, ...] = (
    *(
        Register(n, 64, "data_ptr" if n in ("rbp", "rsp") else "int64", CORE)
        for n in _GP
    ),
    Register("rip", 64, "code_ptr", CORE),
    Register("eflags", 32, "i386_eflags", CORE),
    *(Register(n, 32, "int32", CORE) for n in SEGMENT_NAMES),
    *(Register(f"st{i}", 80, "i387_ext", CORE) for i in range(8)),
    *(Register(n, 32, "int", CORE, "float") for n in _FPU_CTRL),
    *(Register(f"xmm{i}", 128, "vec128", SSE) for i in range(16)),
    Register("mxcsr", 32, "i386_mxcsr", SSE, "vector"),
    Register("fs_base", 64, "int", SEGMENTS),
    Register("gs_base", 64, "int", SEGMENTS),
    *(Register(n, 64, "int64", SYS, "system") for n in CONTROL_NAMES),
)
BY_NAME = {r.name: i for i, r in enumerate(REGISTERS)}
PC_REGNUM = BY_NAME["rip"]

_EFLAGS_FIELDS = (
    ("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9),
    ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19),
    ("VIP", 20), ("ID", 21),
)
_MXCSR_FIELDS = (
    ("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6), ("IM", 7),
    ("DM", 8), ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15),
)
_FEATURE_TYPES = {
    CORE: "".join(
        ['  <flags id="i386_eflags" size="4">\n']
        + [f'    <field name="{n}" start="{s}" end="{s}"/>\n' for n, s in _EFLAGS_FIELDS]
        + ["  </flags>\n"]
    ),
    SSE: (
        '  <vector id="v4f" type="ieee_single" count="4"/>\n'
        '  <vector id="v2d" type="ieee_double" count="2"/>\n'
        '  <vector id="v16i8" type="int8" count="16"/>\n'
        '  <vector id="v8i16" type="int16" count="8"/>\n'
        '  <vector id="v4i32" type="int32" count="4"/>\n'
        '  <vector id="v2i64" type="int64" count="2"/>\n'
        '  <union id="vec128">\n'
        '    <field name="v4_float" type="v4f"/>\n'
        '    <field name="v2_double" type="v2d"/>\n'
        '    <field name="v16_int8" type="v16i8"/>\n'
        '    <field name="v8_int16" type="v8i16"/>\n'
        '    <field name="v4_int32" type="v4i32"/>\n'
        '    <field name="v2_int64" type="v2i64"/>\n'
        '    <field name="uint128" type="uint128"/>\n'
        "  </union>\n"
        + "".join(
            ['  <flags id="i386_mxcsr" size="4">\n']
            + [f'    <field name="{n}" start="{s}" end="{s}"/>\n' for n, s in _MXCSR_FIELDS]
            + ["  </flags>\n"]
        )
    ),
}


def target_xml() -> bytes:
    """The target description GDB reads with qXfer:features:read:target.xml."""
    out = [
        '<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n<target>\n',
        "<architecture>i386:x86-64</architecture>\n",
    ]
    feature = None
    for num, reg in enumerate(REGISTERS):
        if reg.feature != feature:
            if feature is not None:
                out.append("</feature>\n")
            feature = reg.feature
            out.append(f'<feature name="{feature}">\n')
            out.append(_FEATURE_TYPES.get(feature, ""))
        group = f' group="{reg.group}"' if reg.group else ""
        out.append(
            f'  <reg name="{reg.name}" bitsize="{reg.bits}" type="{reg.type}" '
            f'regnum="{num}"{group}/>\n'
        )
    out.append("</feature>\n</target>\n")
    return "".join(out).encode("ascii")


@dataclass
class CpuState:
    """One vCPU's registers as KVM returns them; the unit GDB reads and writes."""

    regs: b.kvm_regs
    sregs: b.kvm_sregs
    fpu: b.kvm_fpu


def _full_tag(state: CpuState) -> int:
    """GDB's 16-bit x87 tag word from FXSAVE's abridged one (as GDB's i387_tag does)."""
    fpu = state.fpu
    top = (fpu.fsw >> 11) & 7
    tag = 0
    for phys in range(8):
        if not fpu.ftwx & (1 << phys):
            t = 3  # empty
        else:
            raw = bytes(fpu.fpr[(phys - top) & 7])
            exponent = int.from_bytes(raw[8:10], "little") & 0x7FFF
            mantissa = int.from_bytes(raw[:8], "little")
            if exponent == 0x7FFF:
                t = 2  # special
            elif exponent == 0:
                t = 1 if mantissa == 0 else 2  # zero, or denormal (special)
            else:
                t = 0 if mantissa >> 63 else 2  # valid, or unnormal (special)
        tag |= t << (2 * phys)
    return tag


def read_register(state: CpuState, num: int) -> bytes:
    """Register num's value as GDB wants it: little-endian, exactly its size."""
    reg = REGISTERS[num]
    name = reg.name
    r, s, f = state.regs, state.sregs, state.fpu
    value: int
    if name in _GP or name == "rip":
        value = getattr(r, name)
    elif name == "eflags":
        value = r.rflags & 0xFFFFFFFF
    elif name in SEGMENT_NAMES:
        value = getattr(s, name).selector
    elif name.startswith("st"):
        return bytes(f.fpr[int(name[2:])])[:10]
    elif name.startswith("xmm"):
        return bytes(f.xmm[int(name[3:])])
    elif name == "fctrl":
        value = f.fcw
    elif name == "fstat":
        value = f.fsw
    elif name == "ftag":
        value = _full_tag(state)
    elif name == "fiseg":
        value = (f.last_ip >> 32) & 0xFFFF
    elif name == "fioff":
        value = f.last_ip & 0xFFFFFFFF
    elif name == "foseg":
        value = (f.last_dp >> 32) & 0xFFFF
    elif name == "fooff":
        value = f.last_dp & 0xFFFFFFFF
    elif name == "fop":
        value = f.last_opcode & 0x7FF
    elif name == "mxcsr":
        value = f.mxcsr
    elif name in ("fs_base", "gs_base"):
        value = getattr(s, name[:2]).base
    else:  # control registers
        value = getattr(s, name)
    return (value & ((1 << reg.bits) - 1)).to_bytes(reg.size, "little")


def read_all(state: CpuState) -> bytes:
    """The g packet's data: every register in order."""
    return b"".join(read_register(state, n) for n in range(len(REGISTERS)))


def write_register(state: CpuState, num: int, data: bytes) -> set[str]:
    """Store data into register num; return which of regs/sregs/fpu changed.

    Raises ValueError for a value KVM cannot take as such: a segment selector differing
    from the current one (its descriptor cache would be stale).
    """
    reg = REGISTERS[num]
    if len(data) != reg.size:
        raise ValueError(f"{reg.name} is {reg.size} bytes, got {len(data)}")
    name = reg.name
    value = int.from_bytes(data, "little")
    r, s, f = state.regs, state.sregs, state.fpu
    if name in _GP or name == "rip":
        setattr(r, name, value)
        return {"regs"}
    if name == "eflags":
        r.rflags = value
        return {"regs"}
    if name in SEGMENT_NAMES:
        if getattr(s, name).selector != value:
            raise ValueError(f"changing {name} from a debugger is not supported")
        return set()
    if name.startswith("st"):
        i = int(name[2:])
        for j, c in enumerate(data):
            f.fpr[i][j] = c
        return {"fpu"}
    if name.startswith("xmm"):
        i = int(name[3:])
        for j, c in enumerate(data):
            f.xmm[i][j] = c
        return {"fpu"}
    if name == "fctrl":
        f.fcw = value & 0xFFFF
    elif name == "fstat":
        f.fsw = value & 0xFFFF
    elif name == "ftag":
        f.ftwx = sum(1 << i for i in range(8) if (value >> (2 * i)) & 3 != 3)
    elif name == "fiseg":
        f.last_ip = (f.last_ip & 0xFFFFFFFF) | ((value & 0xFFFF) << 32)
    elif name == "fioff":
        f.last_ip = (f.last_ip & ~0xFFFFFFFF) | value
    elif name == "foseg":
        f.last_dp = (f.last_dp & 0xFFFFFFFF) | ((value & 0xFFFF) << 32)
    elif name == "fooff":
        f.last_dp = (f.last_dp & ~0xFFFFFFFF) | value
    elif name == "fop":
        f.last_opcode = value & 0x7FF
    elif name == "mxcsr":
        f.mxcsr = value
    elif name in ("fs_base", "gs_base"):
        getattr(s, name[:2]).base = value
        return {"sregs"}
    else:
        setattr(s, name, value)
        return {"sregs"}
    return {"fpu"}


def write_all(state: CpuState, data: bytes) -> set[str]:
    """Apply a G packet's data (it may stop short: GDB sends what it knows)."""
    changed: set[str] = set()
    off = 0
    for num, reg in enumerate(REGISTERS):
        if off + reg.size > len(data):
            break
        chunk = data[off : off + reg.size]
        off += reg.size
        if read_register(state, num) != chunk:
            changed |= write_register(state, num, chunk)
    return changed
