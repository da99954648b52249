#!/bin/busybox sh
# /init of the default dvmm test guest (/lab/initramfs.gz inside the lab, build/lab/guest/initramfs.gz).
#
# Kernel command line parameters (read from /proc/cmdline):
#   dvmm.run=<base64>    a shell script, base64-encoded (no spaces); run after boot.  `guest-arg 'CMD'`
#                        (tests/lab/guest-arg, /usr/local/bin/guest-arg in the lab) prints this parameter.
#   dvmm.script=<path>   run `sh <path>`, e.g. dvmm.script=/dev/vda: a raw virtio disk holding a script
#                        (end it with an `exit` line; the zero padding after it is never read).
#   dvmm.then=poweroff|reboot|shell|halt
#                        what to do after the script (default poweroff). Without a script: a shell on the
#                        console, then poweroff when it exits.
# Console markers (one line each, on /dev/console):
#   DVMM-GUEST: userspace up            first thing /init does
#   DVMM-GUEST: ready                   modules loaded, about to run the script / shell
#   DVMM-GUEST: run exit=<N>            the script finished with status N
#   DVMM-GUEST: poweroff | reboot       just before `poweroff -f` / `reboot -f`
echo "DVMM-GUEST: userspace up"
export PATH=/bin:/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /tmp 2>/dev/null
for m in $(cat /lib/modules/load.list); do
	insmod "/lib/modules/$m" 2>/dev/null || echo "DVMM-GUEST: insmod $m failed"
done
hostname dvmm-guest
ip link set lo up 2>/dev/null

run="" script="" then=""
for arg in $(cat /proc/cmdline); do
	case $arg in
	dvmm.run=*) run=${arg#dvmm.run=} ;;
	dvmm.script=*) script=${arg#dvmm.script=} ;;
	dvmm.then=*) then=${arg#dvmm.then=} ;;
	esac
done

finish() {
	case $1 in
	reboot) echo "DVMM-GUEST: reboot"; sync; reboot -f ;;
	halt) echo "DVMM-GUEST: halt"; sync; halt -f ;;
	shell) setsid cttyhack sh -l; finish poweroff ;;
	*) echo "DVMM-GUEST: poweroff"; sync; poweroff -f ;;
	esac
	sleep 5 # poweroff -f returned: the VMM ignored it
	echo "DVMM-GUEST: $1 failed"
	while :; do sleep 3600; done
}

echo "DVMM-GUEST: ready"
if [ -n "$run" ]; then
	echo "$run" | base64 -d >/tmp/dvmm-run.sh
	sh /tmp/dvmm-run.sh
	echo "DVMM-GUEST: run exit=$?"
	finish "${then:-poweroff}"
elif [ -n "$script" ]; then
	sh "$script"
	echo "DVMM-GUEST: run exit=$?"
	finish "${then:-poweroff}"
else
	finish shell
fi
