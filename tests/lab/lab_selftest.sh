#!/bin/bash
# Proves the KVM lab works and measures it. On the host: tests/lab/lab_selftest.sh [run options]
# (boots the lab and re-runs itself inside). Inside the lab (DVMM_LAB=1) it checks:
#   /dev/kvm and /dev/net/tun exist; dvmm, deno, qemu-system-x86_64 are on PATH;
#   Deno FFI: tests/lab/ffi_probe.ts dlopens build/libkvmshim.so, kvs_open("/dev/kvm"), KVM_GET_API_VERSION;
#   QEMU -accel kvm boots the default guest (/lab/vmlinuz + /lab/initramfs.gz) through each /init path:
#     dvmm.run (base64 script) + poweroff, dvmm.then=reboot, dvmm.script=/dev/vda, the console shell.
# and prints timings. Exit 0 = all passed; 1 = a check failed; 124/125 = lab timeout/fault (tests/lab/run).
set -u
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

if [[ -z ${DVMM_LAB:-} ]]; then
	# Host side: make sure the probe is compiled into the carried DENO_DIR, then run ourselves in the lab.
	export DENO_DIR=${DENO_DIR:-$ROOT/build/deno_dir}
	deno=$(command -v deno || echo "$ROOT/.tools/deno")
	"$deno" cache --quiet "$HERE/ffi_probe.ts" || echo "selftest: warning: could not cache ffi_probe.ts" >&2
	t0=$EPOCHREALTIME
	LAB_VERBOSE=1 "$HERE/run" "$@" -- bash tests/lab/lab_selftest.sh
	rc=$?
	echo "selftest: lab run took $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')s on the host, exit $rc" >&2
	exit $rc
fi

fails=0
ok() { echo "ok   - $*"; }
bad() { echo "FAIL - $*"; fails=$((fails + 1)); }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
echo "lab: kernel $(uname -r), $(nproc) vCPUs, $(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo) MiB," \
	"COMMAND started $(cut -d' ' -f1 /proc/uptime)s after lab kernel start"

[[ -c /dev/kvm ]] && ok "/dev/kvm exists" || bad "/dev/kvm missing"
[[ -c /dev/net/tun ]] && ok "/dev/net/tun exists" || bad "/dev/net/tun missing"
for c in dvmm deno qemu-system-x86_64; do
	command -v "$c" >/dev/null && ok "$c on PATH ($(command -v "$c"))" || bad "$c not on PATH"
done
[[ -x .tools/deno ]] && ok ".tools/deno runs" || bad ".tools/deno missing"

t=$EPOCHREALTIME
v=$(deno --version 2>&1 | head -n1)
echo "time: deno --version: $(secs "$t" "$EPOCHREALTIME")s ($v)"

t=$EPOCHREALTIME
out=$(deno run --allow-all --quiet --no-prompt tests/lab/ffi_probe.ts 2>&1)
r=$?
echo "time: deno run tests/lab/ffi_probe.ts (cached): $(secs "$t" "$EPOCHREALTIME")s"
[[ $r == 0 && $out == *"FFI-PROBE: OK"* ]] && ok "Deno FFI: $out" || bad "Deno FFI probe (exit $r): $out"
t=$EPOCHREALTIME
deno run --quiet --no-prompt tests/lab/ffi_probe.ts >/dev/null 2>&1 # no --allow-ffi: must fail, fast
echo "time: deno run, trivial failing start: $(secs "$t" "$EPOCHREALTIME")s"

# The default guest under QEMU -accel kvm. $1 = name, $2 = extra cmdline, rest = extra qemu args;
# stdin goes to the guest console. Output in /tmp/guest-$1.log.
guest() {
	local name=$1 append=$2 t
	shift 2
	t=$EPOCHREALTIME
	timeout 120 qemu-system-x86_64 -accel kvm -M microvm,rtc=on -cpu host -m 256 -smp 1 \
		-nodefaults -no-user-config -display none -monitor none -serial stdio -no-reboot \
		-kernel /lab/vmlinuz -initrd /lab/initramfs.gz -append "console=ttyS0 $append" "$@" \
		>"/tmp/guest-$name.log" 2>&1
	GRC=$?
	GTIME=$(secs "$t" "$EPOCHREALTIME")
	tr -d '\r' <"/tmp/guest-$name.log" >"/tmp/guest-$name.txt"
}
expect() { # name marker...
	local name=$1 m
	shift
	for m in "$@"; do
		if ! grep -qF -- "$m" "/tmp/guest-$name.txt"; then
			bad "guest $name: no '$m' (qemu exit $GRC, ${GTIME}s); last lines:"
			tail -n 15 "/tmp/guest-$name.txt" | sed 's/^/    /'
			return 1
		fi
	done
	[[ $GRC == 0 ]] || { bad "guest $name: qemu exit $GRC"; return 1; }
	ok "guest $name (${GTIME}s)"
}

guest run "quiet $(guest-arg 'echo GUEST-RAN-$((6*7)); exit 3')" </dev/null
expect run "DVMM-GUEST: userspace up" "GUEST-RAN-42" "DVMM-GUEST: run exit=3" "DVMM-GUEST: poweroff"
echo "time: inner QEMU -accel kvm, default guest boot to poweroff (quiet): ${GTIME}s"

guest loud "$(guest-arg 'true')" </dev/null
expect loud "DVMM-GUEST: userspace up" "DVMM-GUEST: run exit=0"
echo "time: inner QEMU -accel kvm, default guest boot to poweroff (full console log): ${GTIME}s;" \
	"guest kernel reached /init at $(grep -B1 'DVMM-GUEST: userspace up' /tmp/guest-loud.txt | grep -o '^\[ *[0-9.]*\]' | head -n1)"

guest reboot "quiet $(guest-arg 'echo R') dvmm.then=reboot" </dev/null
expect reboot "DVMM-GUEST: run exit=0" "DVMM-GUEST: reboot"

printf 'echo FROM-DISK-$((1+1))\nexit 5\n' >/tmp/script.img
truncate -s 64K /tmp/script.img
guest script "quiet dvmm.script=/dev/vda" \
	-drive if=none,id=s,file=/tmp/script.img,format=raw -device virtio-blk-device,drive=s </dev/null
expect script "FROM-DISK-2" "DVMM-GUEST: run exit=5" "DVMM-GUEST: poweroff"

# No script: a shell on the console; feed it commands through the serial port.
feed() { # wait for the shell, then type into the guest console
	for _ in $(seq 900); do grep -q 'DVMM-GUEST: ready' /tmp/guest-shell.log 2>/dev/null && break; sleep 0.2; done
	sleep 2
	echo 'echo SHELL-$((2+3)); poweroff -f'
}
guest shell quiet < <(feed)
expect shell "DVMM-GUEST: ready" "SHELL-5"

echo "lab: $((fails)) failure(s)"
[[ $fails == 0 ]]
