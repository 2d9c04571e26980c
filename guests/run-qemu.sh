#!/bin/sh
# Boot one guest under QEMU the way the tests do; QEMU exits with (status << 1) | 1
# (plain 0 after the fault guest's triple fault, thanks to -no-reboot).
#   usage: [MACHINE=microvm|pc] [ACCEL=kvm|tcg] guests/run-qemu.sh GUEST [CMDLINE] [QEMU ARGS...]
#   e.g.:  MACHINE=pc guests/run-qemu.sh smp "" -smp 2
set -e
guest=$1; shift
cmdline=${1-}; [ $# -gt 0 ] && shift
dir=$(dirname "$0")
exec qemu-system-x86_64 -accel "${ACCEL:-kvm}" -M "${MACHINE:-microvm}" -m "${MEM:-64M}" \
    -display none -no-reboot -serial stdio -monitor none \
    -device isa-debug-exit,iobase=0xf4,iosize=4 \
    -kernel "$dir/build/$guest.elf" -append "$cmdline" "$@"
