#!/bin/sh
# Runs inside the KVM lab: drives a real guest through dvmm's REST API with curl, the way Cloud
# Hypervisor's users do. Prints "=== CASE name" / "=== END name exit=N" sections plus one line per
# request: "HTTP <method> <endpoint> <status>" and the JSON body when there is one.
S=/tmp/dvmm-api.sock
T=/tmp/api-checks
mkdir -p $T
rm -f $S $T/serial.out

api() { # api METHOD ENDPOINT [JSON]
	if [ -n "${3:-}" ]; then
		code=$(curl -s -o $T/body -w '%{http_code}' --unix-socket $S -X "$1" -H 'Content-Type: application/json' \
			-d "$3" "http://localhost/api/v1/$2")
	else
		code=$(curl -s -o $T/body -w '%{http_code}' --unix-socket $S -X "$1" "http://localhost/api/v1/$2")
	fi
	echo "HTTP $1 $2 $code"
	[ -s $T/body ] && { cat $T/body; echo; }
	return 0
}

. "$(dirname "$0")/checks_lib.sh"

echo "=== CASE api"
dvmm --api-socket path=$S >$T/dvmm.out 2>&1 &
pid=$!
i=0
while [ ! -S $S ] && [ $i -lt 240 ]; do sleep 0.5; i=$((i + 1)); done
ls -l $S | cut -c1-10

api GET vmm.ping
api GET vm.info
SCRIPT=$(guest-arg 'echo guest-running; sleep 600')
CONFIG='{"cpus":{"boot_vcpus":2,"max_vcpus":2},"memory":{"size":268435456},
 "payload":{"kernel":"/lab/vmlinuz","initramfs":"/lab/initramfs.gz","cmdline":"console=ttyS0 quiet panic=-1 '"$SCRIPT"'"},
 "serial":{"mode":"File","file":"'$T/serial.out'"},"console":{"mode":"Off"}}'
api PUT vm.create "$CONFIG"
api PUT vm.create "$CONFIG"
api GET vm.info
api PUT vm.boot
if wait_for $T/serial.out guest-running 240; then echo "guest is running"; fi
api GET vm.info
api PUT vm.pause
api GET vm.info
api PUT vm.pause
api PUT vm.resume
api GET vm.counters
api PUT vm.shutdown
api GET vm.info
api PUT vm.delete
api GET vm.info
api PUT vm.create "$CONFIG"
api GET vm.info
api PUT vmm.shutdown
wait $pid
rc=$?
[ -S $S ] && echo "socket still there" || echo "socket removed"
echo "--- serial"
cat $T/serial.out
echo "--- dvmm"
cat $T/dvmm.out
echo "=== END api exit=$rc"

# vm.power-button: the GED interrupt reaches the guest, whose ACPI button driver reports KEY_POWER
# on its input device; the guest script prints the raw input events, then powers off.
echo "=== CASE power-button"
S2=/tmp/dvmm-pb.sock
rm -f $S2
: >$T/pb.out
PB='ev=$(grep -A4 "Power Button" /proc/bus/input/devices | grep -o "event[0-9]*" | head -n1)
echo "pb-device $ev"; echo pb-ready
hexdump -n 48 -e "16/1 \"%02x \" \"\n\"" /dev/input/$ev
grep ACPI:Ged /proc/interrupts'
timeout 300 dvmm --kernel /lab/vmlinuz --initramfs /lab/initramfs.gz \
	--cmdline "console=ttyS0 quiet panic=-1 $(guest-arg "$PB")" --cpus boot=1 --memory size=256M \
	--serial tty --console off --api-socket path=$S2 </dev/null >$T/pb.out 2>&1 &
pid=$!
wait_for $T/pb.out pb-ready 240 && sleep 1
echo "power-button HTTP $(curl -s -o /dev/null -w '%{http_code}' --unix-socket $S2 -X PUT \
	http://localhost/api/v1/vm.power-button)"
wait $pid
rc=$?
grep -v '^\[' $T/pb.out
echo "=== END power-button exit=$rc"
