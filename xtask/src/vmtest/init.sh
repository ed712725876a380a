#!/bin/busybox sh
# PID 1 of the VM tier's initramfs (see initramfs.rs). The kernel command line names
# vmtest.out (the results directory, shared read-write at the same path), vmtest.modules
# (the booted kernel's unpacked lib/modules/<version>) and vmtest.script (run as root in
# the host's root filesystem: read-only over 9p, writable through a tmpfs overlay).
/bin/busybox mkdir -p /proc /sys /ro /rw /newroot
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p"; }
fail() { echo "vmtest-init: $*"; echo "vmtest-init: FAILED"; poweroff -f; }
OUT=$(arg vmtest.out)
MODULES=$(arg vmtest.modules)
SCRIPT=$(arg vmtest.script)

for m in $(cat /modules.list); do insmod "/modules/$m" || fail "insmod $m"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /ro || fail "mounting the host's root"
mount -t tmpfs tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work /newroot || fail "overlay on the host's root"

R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t bpf bpf $R/sys/fs/bpf || fail "mounting bpffs"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null
# Fresh /tmp and /run, unless the checkout itself lives there (a clone in /tmp): then the
# overlay keeps the host's copy visible, and writable through its tmpfs upper layer.
for d in /tmp /run; do
    case "$OUT $MODULES $SCRIPT" in *"$d/"*) continue ;; esac
    mount -t tmpfs tmpfs $R$d
done
mkdir -p "$R$OUT"
mount -t 9p -o trans=virtio,version=9p2000.L,rw,msize=512000 out "$R$OUT" || fail "mounting the results directory"
# modprobe (and the kernel's module autoload) find the booted kernel's modules.
mkdir -p "$R/lib/modules/$(uname -r)"
mount --bind "$R$MODULES" "$R/lib/modules/$(uname -r)" || fail "binding the modules of $(uname -r)"

# The kernel's module autoload runs its helper in this (initramfs) root, not the chroot.
printf '#!/bin/sh\nexec chroot /newroot /sbin/modprobe "$@"\n' > /bin/vmtest-modprobe
chmod +x /bin/vmtest-modprobe
echo /bin/vmtest-modprobe > /proc/sys/kernel/modprobe

chroot $R /bin/sh "$SCRIPT"
echo "vmtest-init: tier script exited $?"
sync
poweroff -f
