#!/bin/sh
# Runs inside the KVM lab (tests/lab/run): boots the default guest under dvmm several ways and prints
# each case's output between "=== CASE name" / "=== END name exit=N" lines for tests/lab_boot_test.ts.
# Usage: boot_checks.sh [PVH_VMLINUX]
KERNEL=/lab/vmlinuz
INITRD=/lab/initramfs.gz
PVH=${1:-}
T=/tmp/boot-checks
mkdir -p $T

. "$(dirname "$0")/checks_lib.sh"

case_begin() { echo "=== CASE $1"; }
case_end() { echo "=== END $1 exit=$2"; }

# 1. Two vCPUs, 384 MiB: the guest reports what it sees, then powers off; dvmm must exit 0.
case_begin smp2
timeout 300 dvmm --kernel $KERNEL --initramfs $INITRD \
	--cmdline "console=ttyS0 quiet panic=-1 dvmm.marker=smp2 $(guest-arg 'echo "cpus=$(nproc)"; grep MemTotal /proc/meminfo; echo "cmdline=$(cat /proc/cmdline)"; grep -c ^processor /proc/cpuinfo; grep -q tsc_deadline_timer /proc/cpuinfo && echo tsc-deadline=yes; echo "clockevent=$(cat /sys/devices/system/clockevents/clockevent0/current_device)"')" \
	--cpus boot=2 --memory size=384M --serial tty --console off </dev/null
case_end smp2 $?

# 2. Serial input: a shell on ttyS0 reads a line from dvmm's stdin, runs it, exits -> poweroff.
case_begin serial-input
rm -f $T/in
: >$T/out
mkfifo $T/in
timeout 300 dvmm --kernel $KERNEL --initramfs $INITRD --cmdline "console=ttyS0 quiet panic=-1" \
	--cpus boot=1 --memory size=256M --serial tty --console off <$T/in >$T/out 2>&1 &
pid=$!
exec 3>$T/in
if wait_for $T/out "DVMM-GUEST: ready" 240; then
	sleep 3
	printf 'echo "serial-input-$((6 * 7))"; exit\n' >&3
fi
wait $pid
rc=$?
exec 3>&-
cat $T/out
case_end serial-input $rc

# 3. Guest reboot: the first boot runs `reboot -f`; dvmm must boot the guest again. After the second
# boot is seen the VMM is stopped with SIGTERM.
case_begin reboot
: >$T/reboot.out # exists before the poll below reads it (the job's redirection runs in the child)
timeout 300 dvmm --kernel $KERNEL --initramfs $INITRD \
	--cmdline "console=ttyS0 quiet panic=-1 dvmm.then=reboot $(guest-arg 'echo boot-done')" \
	--cpus boot=2 --memory size=256M --serial tty --console off </dev/null >$T/reboot.out 2>&1 &
pid=$!
i=0
while [ "$(grep -c 'DVMM-GUEST: userspace up' $T/reboot.out 2>/dev/null || true)" -lt 2 ] && [ $i -lt 480 ] && kill -0 $pid 2>/dev/null; do
	sleep 0.5
	i=$((i + 1))
done
kill -TERM $pid 2>/dev/null
wait $pid
rc=$?
echo "(waited $i half-seconds)"
cat $T/reboot.out
case_end reboot $rc

# 4. PVH: the ELF vmlinux from the bzImage's payload, entered through its Xen PVH note.
if [ -n "$PVH" ]; then
	case_begin pvh
	timeout 300 dvmm --kernel "$PVH" --initramfs $INITRD \
		--cmdline "console=ttyS0 quiet panic=-1 $(guest-arg 'echo "pvh-cpus=$(nproc)"')" \
		--cpus boot=2 --memory size=256M --serial tty --console off </dev/null
	case_end pvh $?
fi
