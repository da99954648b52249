#!/bin/busybox sh
# /init of the lab's tiny initramfs: load virtio-mmio + virtio-blk, find the lab root filesystem
# (the disk whose root holds /sbin/lab-init), switch_root into it. Any failure powers the VM off, which
# tests/lab/run reports as a LAB FAULT.
export PATH=/bin
fault() { echo "LAB-INITRD FAULT: $*"; poweroff -f; sleep 10; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "lab-initrd: up"
for m in $(cat /lib/modules/load.list); do insmod "/lib/modules/$m" || fault "insmod $m"; done
i=0
while :; do
	for d in /dev/vd?; do
		[ -b "$d" ] || continue
		if mount -t ext4 "$d" /newroot 2>/dev/null; then
			[ -x /newroot/sbin/lab-init ] && break 2
			umount /newroot
		fi
	done
	i=$((i + 1))
	[ $i -gt 300 ] && fault "no lab root filesystem (disks: $(ls /dev/vd* 2>/dev/null))"
	sleep 0.1
done
echo "lab-initrd: root is $d"
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/lab-init
