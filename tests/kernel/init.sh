#!/bin/busybox sh
# PID 1 of the qemu guest (packed into the initramfs by setup.sh as /init).
#
# Loads the modules listed in /modules.list, creates vcan0, loads i2c-stub with the chips named
# on the kernel command line, and builds the guest's root: the host's / (shared read-only over
# 9p, so the guest runs the host's Python and the checkout's .venv) under an overlay whose
# writable layer is RAM, so whatever a test writes (/tmp, a socket, a cache) works and is gone
# at power-off. Only the read-write share, mounted on top at the path it has on the host,
# reaches the host. Runs $PYBMS_SHARE/run.sh there, writes its exit code to
# $PYBMS_SHARE/exit_code and powers off. Kernel command-line KEY=value entries arrive here as
# environment variables: PYBMS_SHARE (required), PYBMS_I2C_STUB_ADDRS and PYBMS_GUEST_INIT.
#
# With PYBMS_GUEST_INIT=systemd, run.sh only prepares that root (units, users, config); then
# this script hands PID 1 to the host's systemd on it (switch_root), which boots the unit named
# by systemd.unit= on the command line; that unit writes exit_code and powers the guest off.
/bin/busybox --install -s /bin
export PATH=/bin

t() { read -r up _ </proc/uptime; echo "[guest-init t=${up}s] $*"; }
fail() { echo "PYBMS-INIT-ERROR: $*"; }
give_up() { fail "$*"; poweroff -f; }

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
t "kernel $(uname -r) up; loading modules"

while read -r m; do
  case "$m" in
    i2c-stub.ko) insmod "/mods/$m" "chip_addr=${PYBMS_I2C_STUB_ADDRS:-0x40}" ;;
    *) insmod "/mods/$m" ;;
  esac || fail "insmod $m failed"
done </modules.list
t "modules loaded"

{ ip link add dev vcan0 type vcan && ip link set vcan0 up; } || fail "vcan0 setup failed"
ip link set lo up

[ -n "$PYBMS_SHARE" ] || give_up "no PYBMS_SHARE on the kernel command line"
mkdir -p /host /ram /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro hostroot /host \
  || give_up "mounting the host root failed"
mount -t tmpfs -o mode=0755 ram /ram
mkdir -p /ram/upper /ram/work
mount -t overlay -o lowerdir=/host,upperdir=/ram/upper,workdir=/ram/work overlay /newroot \
  || give_up "mounting the overlay root failed"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs shm /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mkdir -p "/newroot$PYBMS_SHARE"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share "/newroot$PYBMS_SHARE" \
  || give_up "mounting the read-write share failed"
t "filesystems mounted; running $PYBMS_SHARE/run.sh"

chroot /newroot /usr/bin/env -i \
  PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root PYTHONDONTWRITEBYTECODE=1 \
  PYBMS_KERNEL_GUEST=1 PYBMS_SHARE="$PYBMS_SHARE" \
  /bin/sh "$PYBMS_SHARE/run.sh"
rc=$?
if [ "$PYBMS_GUEST_INIT" = systemd ] && [ "$rc" = 0 ]; then
  t "root prepared; systemd takes over as PID 1"
  # switch_root moves /newroot (with the mounts under it) to /, frees the initramfs and execs
  # systemd as PID 1. If it cannot, PID 1 ends: the kernel panics and qemu exits (panic=-1),
  # with switch_root's error on the console.
  exec switch_root /newroot /lib/systemd/systemd
fi
[ "$PYBMS_GUEST_INIT" = systemd ] && fail "preparing the root for systemd failed ($rc)"
echo "PYBMS-GUEST-EXIT-CODE=$rc"
echo "$rc" >"/newroot$PYBMS_SHARE/exit_code"
t "done; powering off"
sync
poweroff -f
