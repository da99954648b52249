#!/bin/bash
# Runs inside the KVM lab: the REST examples of Cloud Hypervisor's API document, verbatim, against a
# real `dvmm --api-socket path=/tmp/cloud-hypervisor.sock`. The files the example VM names are put
# where it expects them: the Debian kernel as its kernel, a sparse raw image as its disk. The example
# gives no initramfs, so the guest kernel runs until it finds no root filesystem; what is checked is
# that every request gets the answer the API document gives, with a real VM behind it.
# Output: "=== CASE seed" ... "STATUS <name> <code>" lines ... "=== END seed exit=N".
set -u
mkdir -p /opt/clh/kernel /opt/clh/images
ln -sf /lab/vmlinuz /opt/clh/kernel/vmlinux-virtio-fs-virtio-iommu
truncate -s 64M /opt/clh/images/focal-server-cloudimg-amd64.raw
rm -f /tmp/cloud-hypervisor.sock
echo "=== CASE seed"
dvmm --api-socket path=/tmp/cloud-hypervisor.sock >/tmp/seed-dvmm.out 2>&1 </dev/null &
pid=$!
for _ in $(seq 240); do [ -S /tmp/cloud-hypervisor.sock ] && break; sleep 0.5; done

status() { # status NAME: runs the example on stdin with bash, prints its HTTP status line
	out=$(bash)
	echo "STATUS $1 $(printf '%s\n' "$out" | head -n1 | tr -d '\r' | cut -d' ' -f2)"
	printf '%s\n' "$out" | tr -d '\r' | sed -n '/^$/,$p' | sed '/^$/d'
}

status create <<'CURL'
curl --unix-socket /tmp/cloud-hypervisor.sock -i \
     -X PUT 'http://localhost/api/v1/vm.create'  \
     -H 'Accept: application/json'               \
     -H 'Content-Type: application/json'         \
     -d '{
         "cpus":{"boot_vcpus": 4, "max_vcpus": 4},
         "payload":{"kernel":"/opt/clh/kernel/vmlinux-virtio-fs-virtio-iommu", "cmdline":"console=ttyS0 console=hvc0 root=/dev/vda1 rw"},
         "disks":[{"path":"/opt/clh/images/focal-server-cloudimg-amd64.raw"}],
         "rng":{"src":"/dev/urandom"},
         "net":[{"ip":"192.168.10.10", "mask":"255.255.255.0", "mac":"12:34:56:78:90:01"}]
         }'
CURL
status boot <<'CURL'
curl --unix-socket /tmp/cloud-hypervisor.sock -i -X PUT 'http://localhost/api/v1/vm.boot'
CURL
sleep 5
status info <<'CURL'
curl --unix-socket /tmp/cloud-hypervisor.sock -i \
     -X GET 'http://localhost/api/v1/vm.info' \
     -H 'Accept: application/json'
CURL
ip -o -4 addr show | grep -o 'vmtap[0-9]* .*192\.168\.10\.10/24' | head -n1 | sed 's/^/TAP /'
status reboot <<'CURL'
curl --unix-socket /tmp/cloud-hypervisor.sock -i -X PUT 'http://localhost/api/v1/vm.reboot'
CURL
status shutdown <<'CURL'
curl --unix-socket /tmp/cloud-hypervisor.sock -i -X PUT 'http://localhost/api/v1/vm.shutdown'
CURL
curl -s --unix-socket /tmp/cloud-hypervisor.sock -X PUT http://localhost/api/v1/vmm.shutdown
wait $pid
rc=$?
echo "--- dvmm"
grep -v '^\[' /tmp/seed-dvmm.out | tail -n 20
echo "=== END seed exit=$rc"
