#!/bin/busybox sh
# The lab's L1 init (PID 1 of the Linux guest QEMU-TCG boots; lab/initramfs.py packs it
# as /init beside a static busybox and the modules in /modules, in load order).
#
# It loads the modules (with the MODULE.param= words of the kernel command line:
# kvm_amd.npt=, kvm_amd.nested=1), mounts the host's root read-only over 9p at /host with the guest's own
# /proc, /sys, /dev and tmpfs wherever the command may write, mounts the per-run share
# (tag "lab": the command script, its output, its status) and any writable host
# directories it lists, checks /dev/kvm (and with lab.iommu=1 an IOMMU group, /dev/vfio/vfio,
# and binds the edu device to vfio-pci), runs the
# command chrooted into /host, writes its status, and powers off.
#
# Each failure prints one "lab-init: error KIND: DETAIL" line on the console (the per-run
# share may not exist yet) and powers off; lab/vm.py turns it into its "lab:" line.
export PATH=/bin
/bin/busybox mkdir -p /bin /proc /sys /dev /host /lab
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

NINEP="trans=virtio,version=9p2000.L,msize=512000"

fail() {
    echo "lab-init: error $1: $2"
    sync
    poweroff -f
}

param() {  # param NAME DEFAULT: the value of lab.NAME= on the kernel command line
    for word in $(cat /proc/cmdline); do
        case "$word" in "lab.$1="*) echo "${word#*=}"; return;; esac
    done
    echo "$2"
}

modargs() {  # modargs MODULE: its MODULE.x=y words on the kernel command line, as x=y
    for word in $(cat /proc/cmdline); do
        case "$word" in "$1."*) echo "${word#"$1".}";; esac
    done
}

# Module parameters come from the kernel command line, as modprobe would take them
# (lab/vm.py puts kvm_amd.npt= and kvm_amd.nested=1 there; --l1-cmdline adds more).
for ko in $(cat /modules/order); do
    name=${ko%.ko}
    out=$(insmod "/modules/$ko" $(modargs "$(echo "$name" | tr - _)") 2>&1) \
        || fail module "$name: $out"
done

mount -t 9p -o "$NINEP" lab /lab || fail mount "the per-run share (9p tag lab)"
mount -t 9p -o "$NINEP,ro,cache=loose" hostroot /host || fail mount "the host root (9p)"
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/shm /host/dev/pts
mount -t devpts devpts /host/dev/pts
for dir in /tmp /run /var/tmp /dev/shm; do
    mount -t tmpfs tmpfs "/host$dir" || fail mount "tmpfs on $dir"
done
# Host directories: "TAG PATH [loose|ro]" per line, each mounted at its own path (made
# first if a tmpfs above hides it: a checkout in /tmp/ci).
while read -r tag path mode; do
    opts="$NINEP"
    [ "$mode" = loose ] && opts="$opts,cache=loose"
    [ "$mode" = ro ] && opts="$opts,ro"
    [ -d "/host$path" ] || mkdir -p "/host$path" 2>/dev/null
    mount -t 9p -o "$opts" "$tag" "/host$path" || fail mount "$path (9p tag $tag)"
done < /lab/mounts
ip link set lo up
hostname lab

[ -c /dev/kvm ] || fail kvm "/dev/kvm is missing after loading kvm_amd ($(dmesg | grep -i -m1 -E 'kvm|svm'))"
if [ "$(param iommu 0)" = 1 ]; then
    [ -n "$(ls /sys/kernel/iommu_groups)" ] || fail iommu "no IOMMU group in /sys/kernel/iommu_groups"
    [ -c /dev/vfio/vfio ] || fail iommu "no /dev/vfio/vfio after loading vfio"
    # QEMU's edu device (1234:11e8) goes to vfio-pci, for the passthrough tests: no other
    # driver claims it, so driver_override and a probe are enough.
    for dev in /sys/bus/pci/devices/*; do
        [ "$(cat "$dev/vendor"):$(cat "$dev/device")" = 0x1234:0x11e8 ] || continue
        echo vfio-pci > "$dev/driver_override"
        echo "${dev##*/}" > /sys/bus/pci/drivers_probe
        [ -e "$dev/driver" ] || fail iommu "${dev##*/} (edu) did not bind to vfio-pci"
    done
fi

mkdir -p /host/run/lab
cp /lab/command /host/run/lab/command
chroot /host /bin/sh /run/lab/command </dev/null >/lab/stdout 2>/lab/stderr
echo $? > /lab/status
sync
poweroff -f
