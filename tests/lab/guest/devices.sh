# Sourced by /init for l2.do=devices: the virtio devices, then the ext4 root on vda.
# virtio-rng: which source the kernel uses, and 32 bytes from it
echo "l2: hwrng=$(cat /sys/class/misc/hw_random/rng_current)" \
     "bytes=$(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \n')"
# virtio-console: a line written only to hvc0. Both consoles end up on corevisor's
# stdout: let the UART drain first (stty sets with TCSADRAIN), so the line is not
# spliced into one the UART is still sending.
stty -F /dev/console "$(stty -F /dev/console -g)"
echo "l2: hvc0 says hello" > /dev/hvc0
# virtio-net: configure eth0 and ping the other end of the TAP
ip addr add 192.0.2.2/24 dev eth0
ip link set eth0 up
driver=$(basename "$(readlink /sys/class/net/eth0/device/driver)")
echo "l2: eth0 driver=$driver $(ping -c 2 -w 30 192.0.2.1 | grep received)"
# virtio-blk: switch to the ext4 root file system, whose /sbin/init writes a file
mount -t ext4 /dev/vda /mnt || echo "l2: cannot mount /dev/vda"
umount /proc /sys
umount /dev
exec switch_root /mnt /sbin/init
