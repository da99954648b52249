#!/bin/sh
# PID 1 of the lab VM (installed as /sbin/lab-init in build/lab/rootfs.ext4; started by
# lab-initrd-init.sh). Sets up /dev/kvm, tun, the run disk, then runs the COMMAND given to tests/lab/run
# with `sh -c` in the checkout, stdout/stderr on virtio-serial ports "lab.out"/"lab.err", and reports
# on port "lab.status" (lines: "init", "started", "exit N", or "fault MESSAGE"). Then powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
log() { echo "lab-init: $*"; }

mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /dev/pts /dev/shm
mount -t devpts -o ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
ln -sf /proc/self/mounts /etc/mtab
hostname lab
ip link set lo up

for m in virtio_console virtio_rng tun kvm_amd; do modprobe "$m" || log "modprobe $m failed"; done

port() { # name -> /dev/vportNpM
	for p in /sys/class/virtio-ports/*; do
		[ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && { echo "/dev/${p##*/}"; return 0; }
	done
	return 1
}
i=0
while ! STATUS=$(port lab.status) || ! OUT=$(port lab.out) || ! ERR=$(port lab.err) \
	|| [ ! -c "$STATUS" ] || [ ! -c "$OUT" ] || [ ! -c "$ERR" ]; do
	i=$((i + 1))
	[ $i -gt 100 ] && { log "FAULT: virtio-serial ports missing"; poweroff -f; }
	sleep 0.1
done
status() { echo "$*" >"$STATUS"; }
fault() { log "FAULT: $*"; status "fault $*"; sync; poweroff -f; sleep 10; }
status init

[ -c /dev/kvm ] || fault "no /dev/kvm (kvm_amd did not load: $(dmesg | grep -i -E 'kvm|svm' | tail -n 3 | tr '\n' ' '))"
[ -c /dev/net/tun ] || log "warning: no /dev/net/tun"

# The run disk: the virtio disk that is not / and holds /env.
rootdev=$(awk '$2 == "/" { print $1 }' /proc/mounts | tail -n1)
mkdir -p /lab/run
for d in /dev/vd?; do
	[ "$d" = "$rootdev" ] && continue
	mount -t ext4 "$d" /lab/run 2>/dev/null || continue
	[ -f /lab/run/env ] && break
	umount /lab/run
done
[ -f /lab/run/env ] || fault "run disk not found"
# env defines LAB_ROOT (host path of the checkout), LAB_ADDS and exported DVMM_* variables.
. /lab/run/env
# Wall clock: host time at QEMU start (lab.epoch=) + time since the lab kernel started.
epoch=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^lab\.epoch=//p')
[ -n "$epoch" ] && date -s "@$(awk -v e="$epoch" '{ printf "%d", e + $1 + 0.5 }' /proc/uptime)" >/dev/null

# The checkout at its host path (so Deno's caches keyed by file path hit) and at /dvmm.
mkdir -p "$LAB_ROOT" && mount --bind /lab/run/repo "$LAB_ROOT" || fault "bind $LAB_ROOT"
[ "$LAB_ROOT" = /dvmm ] || ln -sfn "$LAB_ROOT" /dvmm
for a in $LAB_ADDS; do
	mkdir -p "/work/$a" && mount --bind "/lab/run/add/$a" "/work/$a" || fault "bind /work/$a"
done
printf '#!/bin/sh\nexec %s/build/dvmm "$@"\n' "$LAB_ROOT" >/usr/local/bin/dvmm
chmod 755 /usr/local/bin/dvmm
export DENO_DIR="$LAB_ROOT/build/deno_dir" DVMM_SHIM="$LAB_ROOT/build/libkvmshim.so" DVMM_LAB=1
export DENO_NO_UPDATE_CHECK=1 NO_COLOR=1

log "running command"
status started
cd "$LAB_ROOT"
sh -c "$(cat /lab/run/cmd)" </dev/null >"$OUT" 2>"$ERR"
rc=$?
cd /
sync
status "exit $rc"
log "command exited with $rc"
umount /lab/run/repo 2>/dev/null
poweroff -f
sleep 10
