/**
 * PCI hotplug in the KVM lab, with the stock guest and its own ACPI hotplug driver (acpiphp), no agent:
 *
 * 1. `add-disk` on the running guest: /dev/vdb appears and reads the host image's token. The time from
 *    the API call to the guest's read is measured here (the lab host's clock, 10 ms resolution).
 * 2. `remove-device`: the guest lets go (eject), /dev/vdb and the PCI function are gone in the guest and
 *    from dvmm's device tree.
 * 3. The same identifier is added again and reads its token again; `resize-disk` grows it to 4 MiB and
 *    the guest's /sys/block/vdb/size follows.
 * 4. 20 add/remove cycles in a row: dvmm's descriptors and threads are counted before and after.
 * 5. `add-net` with a tap: the guest brings the new interface up and pings the host through it; then it
 *    is removed and the interface is gone. `add-pmem`: /dev/pmem0 reads the file's token; removed again.
 * 6. `vm.resize` vCPUs 1 → 3 (ACPI CPU hotplug; the guest onlines them by hand, busybox has no udev),
 *    then back to 1 (the guest offlines and ejects them); dvmm's vCPU threads follow.
 *
 * 7. `vm.resize` desired_ram 384 MiB → 896 MiB (ACPI memory hotplug; the guest onlines the blocks by hand):
 *    its MemTotal grows by 512 MiB.
 *
 * QEMU does the disk and a vCPU hot-add in the same lab run (-M pc: ACPI hotplug, the same guest drivers).
 *
 * The guest script comes from a raw disk (dvmm.script=/dev/vda) and prints on hvc0 (a file here).
 */
import assert from "node:assert/strict";
import { labTail, labUnavailable, runScriptInLab, scriptDisk } from "./helpers/lab.ts";

const why = labUnavailable();

function image(token: string, size = 1 << 20): Uint8Array {
  const b = new Uint8Array(size);
  b.set(new TextEncoder().encode(token));
  return b;
}

const GUEST = `
exec >/dev/hvc0 2>&1
pcis() { ls /sys/bus/pci/devices | tr '\\n' ' '; }
waitdev() { i=0; while [ ! -b $1 ] && [ $i -lt 2400 ]; do usleep 50000; i=$((i+1)); done; }
waitgone() { i=0; while [ -e $1 ] && [ $i -lt 1200 ]; do usleep 50000; i=$((i+1)); done; }
p0=$(pcis)
echo "pci0 $p0"
echo MARK-ready
waitdev /dev/vdb
echo "read1 $(head -c 12 /dev/vdb)"
echo "pci1 $(pcis)"
for d in /sys/bus/pci/devices/*; do echo "bar $d $(head -n 1 $d/resource)"; done
waitgone /dev/vdb
echo "gone1 $([ -e /dev/vdb ] && echo no || echo yes)"
i=0; while [ "$(pcis)" != "$p0" ] && [ $i -lt 200 ]; do usleep 50000; i=$((i+1)); done
echo "pci2 $(pcis)"
waitdev /dev/vdb
echo "read2 $(head -c 12 /dev/vdb)"
i=0; while [ "$(cat /sys/block/vdb/size)" != 8192 ] && [ $i -lt 1200 ]; do usleep 50000; i=$((i+1)); done
echo "size2 $(cat /sys/block/vdb/size)"
read -t 900 -r l </dev/hvc0
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 2400 ]; do usleep 50000; i=$((i+1)); done
ip link set eth0 up; ip addr add 192.168.249.2/24 dev eth0
ping -c 3 -W 3 192.168.249.1 >/dev/null 2>&1; echo "ping-rc $?"
waitgone /sys/class/net/eth0
echo "netgone $([ -e /sys/class/net/eth0 ] && echo no || echo yes)"
waitdev /dev/pmem0
echo "pmem-read $(head -c 12 /dev/pmem0)"
waitgone /dev/pmem0
echo "pmem-gone $([ -e /dev/pmem0 ] && echo no || echo yes)"
i=0; while [ ! -e /sys/devices/system/cpu/cpu2/online ] && [ $i -lt 2400 ]; do usleep 50000; i=$((i+1)); done
echo 1 >/sys/devices/system/cpu/cpu1/online; echo 1 >/sys/devices/system/cpu/cpu2/online
echo "cpus-up $(cat /sys/devices/system/cpu/online) nproc=$(nproc)"
i=0; while [ "$(cat /sys/devices/system/cpu/online)" != 0 ] && [ $i -lt 2400 ]; do usleep 50000; i=$((i+1)); done
echo "cpus-down $(cat /sys/devices/system/cpu/online) nproc=$(nproc)"
mt() { awk '/^MemTotal:/{print $2}' /proc/meminfo; }
m0=$(mt); echo "mem-before $m0"
echo MARK-mem
i=0
while [ $(mt) -lt $((m0 + 512000)) ] && [ $i -lt 2400 ]; do
  for f in /sys/devices/system/memory/memory*/state; do [ "$(cat $f)" = offline ] && echo online >$f 2>/dev/null; done
  usleep 50000; i=$((i+1))
done
echo "mem-after $(mt)"
dmesg | grep -i -E 'acpiphp|hotplug|pci 0000:00:0[0-9a-f].0: \\[' | tail -n 12
echo MARK-done
`;

/** The same disk hotplug under QEMU (i440fx: ACPI PCI hotplug on the root bus, the same acpiphp). */
const QEMU_GUEST = `
exec >/dev/ttyS0 2>&1
waitdev() { i=0; while [ ! -b $1 ] && [ $i -lt 2400 ]; do usleep 50000; i=$((i+1)); done; }
waitgone() { i=0; while [ -e $1 ] && [ $i -lt 1200 ]; do usleep 50000; i=$((i+1)); done; }
echo MARK-qready
waitdev /dev/vdb
echo "qread1 $(head -c 12 /dev/vdb)"
waitgone /dev/vdb
echo "qgone1 $([ -e /dev/vdb ] && echo no || echo yes)"
i=0; while [ ! -e /sys/devices/system/cpu/cpu1/online ] && [ $i -lt 2400 ]; do usleep 50000; i=$((i+1)); done
echo 1 >/sys/devices/system/cpu/cpu1/online
echo "qcpus-up $(cat /sys/devices/system/cpu/online)"
`;

const HOST = (dir: string) => `
set -u
D=/work/${dir}
now() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
waitfor() { # pattern [tries of 20 ms]
  i=0
  while ! grep -q "$1" $D/out.txt 2>/dev/null; do
    i=$((i+1))
    if [ $i -gt \${2:-30000} ]; then echo "timeout waiting for $1"; return 1; fi
    if ! kill -0 $pid 2>/dev/null; then echo "dvmm exited before $1"; return 1; fi
    sleep 0.02
  done
}
api() { dvmm remote --api-socket $D/api.sock "$@"; echo " rc=$?"; }
# curl for the timed calls: dvmm remote's own start-up (a Deno process, slow in the lab) is not the VMM's.
put() { curl -s --unix-socket $D/api.sock -X PUT -H 'Content-Type: application/json' -d "$2" "http://localhost/api/v1/$1"; echo " rc=$?"; }
count() { echo "fds $(ls /proc/$pid/fd | wc -l) threads $(ls /proc/$pid/task | wc -l)"; }
mkfifo $D/in; exec 3<>$D/in
dvmm -v --kernel /lab/vmlinuz --initramfs /lab/initramfs.gz \\
  --cmdline "console=ttyS0 panic=-1 dvmm.script=/dev/vda" \\
  --cpus boot=1,max=3 --memory size=384M,hotplug_size=1G --serial file=$D/serial.txt --console tty \\
  --disk path=$D/guest.sh,readonly=on \\
  --api-socket path=$D/api.sock <&3 >$D/out.txt 2>$D/err.txt &
pid=$!
if waitfor MARK-ready; then
  echo "resets-before-ready $(grep -c 'guest event: reboot' $D/err.txt)"
  t0=$(now)
  echo "=== ADD1"; put vm.add-disk '{"path":"'$D'/a.img","id":"hp0"}'
  waitfor read1 && echo "latency-disk-ms $(( $(now) - t0 ))"
  echo "=== INFO1"; curl -s --unix-socket $D/api.sock http://localhost/api/v1/vm.info; echo
  t0=$(now)
  echo "=== REMOVE1"; put vm.remove-device '{"id":"hp0"}'; echo
  echo "remove-ms $(( $(now) - t0 ))"
  waitfor gone1
  echo "=== INFO2"; curl -s --unix-socket $D/api.sock http://localhost/api/v1/vm.info; echo
  echo "=== ADD2"; api add-disk path=$D/b.img,id=hp0
  waitfor read2
  echo "=== RESIZE"; put vm.resize-disk '{"id":"hp0","desired_size":4194304}'; echo
  waitfor size2
  echo "host-size $(stat -c %s $D/b.img)"
  echo "=== REMOVE2"; api remove-device hp0
  sleep 1
  echo "before $(count)"
  n=0; ok=0
  while [ $n -lt 20 ]; do
    dvmm remote --api-socket $D/api.sock add-disk path=$D/a.img,id=cyc >/dev/null 2>&1 &&
      dvmm remote --api-socket $D/api.sock remove-device cyc >/dev/null 2>&1 && ok=$((ok+1))
    n=$((n+1))
  done
  echo "cycles-ok $ok"
  sleep 2
  echo "after $(count)"
  echo go >&3
  echo "=== ADDNET"; api add-net tap=hp-tap0,ip=192.168.249.1,mask=255.255.255.0,id=hpnet,mac=2e:00:00:00:00:42
  waitfor ping-rc
  echo "=== REMOVENET"; api remove-device hpnet
  waitfor netgone
  echo "=== ADDPMEM"; put vm.add-pmem '{"file":"'$D'/p.img","id":"hppm"}'; echo
  waitfor pmem-read
  echo "=== REMOVEPMEM"; put vm.remove-device '{"id":"hppm"}'; echo
  waitfor pmem-gone
  t0=$(now)
  echo "=== CPUS3"; put vm.resize '{"desired_vcpus":3}'; echo
  waitfor cpus-up && echo "latency-vcpu-ms $(( $(now) - t0 ))"
  echo "threads-3 $(for t in /proc/$pid/task/*; do cat $t/comm; done | grep -c '^vcpu')"
  t0=$(now)
  echo "=== CPUS1"; put vm.resize '{"desired_vcpus":1}'; echo
  echo "unplug-ms $(( $(now) - t0 ))"
  waitfor cpus-down
  echo "threads-1 $(for t in /proc/$pid/task/*; do cat $t/comm; done | grep -c '^vcpu')"
  waitfor MARK-mem
  t0=$(now)
  echo "=== RAM"; put vm.resize '{"desired_ram":939524096}'; echo
  waitfor mem-after && echo "latency-ram-ms $(( $(now) - t0 ))"
  echo "=== INFO3"; curl -s --unix-socket $D/api.sock http://localhost/api/v1/vm.info; echo
  waitfor MARK-done
fi
dvmm remote --api-socket $D/api.sock shutdown-vmm >/dev/null 2>&1
wait $pid
echo "dvmm-exit $?"

# QEMU in the same lab run: device_add / device_del through its monitor (a pipe pair).
waitq() {
  i=0
  while ! grep -q "$1" $D/qout.txt 2>/dev/null; do
    i=$((i+1)); [ $i -gt 30000 ] && { echo "qemu: timeout waiting for $1"; return 1; }
    kill -0 $qpid 2>/dev/null || { echo "qemu exited before $1"; return 1; }
    sleep 0.02
  done
}
mkfifo $D/mon.in $D/mon.out
exec 4<>$D/mon.in
cat $D/mon.out >$D/mon.log &
timeout 400 qemu-system-x86_64 -accel kvm -M pc -cpu host -smp 1,maxcpus=3 -m 384M \
  -nodefaults -no-user-config -display none -no-reboot -serial file:$D/qout.txt -monitor pipe:$D/mon \
  -drive file=$D/qguest.sh,if=virtio,format=raw,readonly=on \
  -kernel /lab/vmlinuz -initrd /lab/initramfs.gz -append "console=ttyS0 panic=-1 dvmm.script=/dev/vda" &
qpid=$!
if waitq MARK-qready; then
  t0=$(now)
  echo "drive_add 0 if=none,id=d1,file=$D/a.img,format=raw" >&4
  echo "device_add virtio-blk-pci,drive=d1,id=hp0" >&4
  waitq qread1 && echo "qemu-latency-disk-ms $(( $(now) - t0 ))"
  t0=$(now)
  echo "device_del hp0" >&4
  waitq qgone1 && echo "qemu-remove-ms $(( $(now) - t0 ))"
  echo "info hotpluggable-cpus" >&4
  t0=$(now)
  echo "device_add host-x86_64-cpu,id=cpu1,socket-id=0,core-id=1,thread-id=0" >&4
  waitq qcpus-up && echo "qemu-latency-vcpu-ms $(( $(now) - t0 ))"
fi
wait $qpid
echo "qemu-exit $?"
echo "=== OUT"; cat $D/out.txt
echo "=== ERR"; cat $D/err.txt
echo "=== SERIAL"; tail -n 40 $D/serial.txt
echo "=== SERIAL-BOOT1"; awk '/Linux version/ { n++ } n == 1' $D/serial.txt | tail -n 30
echo "=== QOUT"; tr -d '\\r' <$D/qout.txt | tail -n 20
echo "=== QMON"; tr -d '\\r' <$D/mon.log | grep -v '^$' | tail -n 30
`;

Deno.test({
  name: "lab: PCI hotplug (ACPI, the guest's acpiphp): add-disk, remove-device, re-add, 20 cycles, add-net",
  ignore: why !== null,
}, async (t) => {
  const res = await runScriptInLab(
    "hotplug",
    {
      "guest.sh": scriptDisk(GUEST),
      "qguest.sh": scriptDisk(QEMU_GUEST),
      "a.img": image("TOKEN-HP-AAA"),
      "b.img": image("TOKEN-HP-BBB"),
      "p.img": image("TOKEN-HP-PMM", 2 << 20),
    },
    HOST,
    { timeout: 700 },
  );
  const out = res.stdout.replaceAll("\r", "");
  const all = out + "\n--- stderr ---\n" + res.stderr;
  const tail = labTail(res, out)(8000);
  const line = (key: string) => out.match(new RegExp(`^${key} ?(.*)$`, "m"))?.[1];
  const section = (s: string) => out.split(`=== ${s}\n`)[1]?.split("\n=== ")[0] ?? "";
  const json = (s: string) => {
    try {
      return JSON.parse(section(s).trim().split("\n")[0]);
    } catch {
      assert.fail(`${s} is not JSON:\n${tail}`);
    }
  };
  if (Deno.env.get("DVMM_LAB_VERBOSE") === "1") console.log(all);
  console.log(
    `same lab run, QEMU 7.2 (-M pc, ACPI hotplug): device_add → guest reads /dev/vdb ` +
      `${line("qemu-latency-disk-ms") ?? "n/a"} ms; device_del → gone ${
        line("qemu-remove-ms") ?? "n/a"
      } ms; ` +
      `vCPU device_add → online in the guest ${line("qemu-latency-vcpu-ms") ?? "n/a"} ms (${
        line("qcpus-up")
      })`,
  );

  await t.step("the guest never resets on its own while devices come and go", () => {
    // A guest that panics (panic=-1) or triple-faults comes back as a new VM from the same config, with
    // the hot-added devices in other slots: say so here rather than through the checks it would upset.
    // A reset while the guest was still booting, before any hotplug, is reported, not failed here: dvmm
    // booted the guest again as Cloud Hypervisor does, and what follows is still a hotplug test (one such
    // early triple fault was seen in the nested lab, cause unknown; the first boot's last lines show where).
    const err = section("ERR").split("\n");
    const resets = err.filter((l) => /guest event: reboot/.test(l));
    const early = Number(line("resets-before-ready") ?? 0);
    if (early > 0) {
      console.warn(
        `the guest reset ${early}× while booting, before any hotplug:\n` +
          err.filter((l) => /guest event: reboot|triple fault/.test(l)).join("\n") +
          `\nthe first boot's last console lines:\n${section("SERIAL-BOOT1")}`,
      );
    }
    assert.ok(
      resets.length <= early,
      `the guest reset while devices came and went:\n${resets.join("\n")}\n${section("SERIAL")}\n${tail}`,
    );
  });
  await t.step("add-disk answers PciDeviceInfo; the guest reads the new disk", () => {
    assert.match(section("ADD1"), /"id":"hp0"/, `ADD1: ${section("ADD1")}\n${tail}`);
    assert.match(section("ADD1"), /"bdf":"0000:00:0[0-9a-f]\.0"/, section("ADD1"));
    assert.equal(line("read1"), "TOKEN-HP-AAA", tail);
    const pci0 = (line("pci0") ?? "").trim().split(" ");
    const pci1 = (line("pci1") ?? "").trim().split(" ");
    assert.equal(pci1.length, pci0.length + 1, `${pci0} → ${pci1}`);
    console.log(`hotplug latency, add-disk call → guest reads /dev/vdb: ${line("latency-disk-ms")} ms`);
    const info = json("INFO1");
    for (const m of out.matchAll(/^bar (.*)$/gm)) console.log(`guest: ${m[1]}`);
    for (
      const [k, v] of Object.entries(
        info.device_tree as Record<string, { resources: { PciBar?: { base: number } }[] }>,
      )
    ) {
      const bar = v.resources?.[0]?.PciBar;
      if (bar) console.log(`dvmm: ${k} BAR 0x${bar.base.toString(16)}`);
    }
    assert.ok(info.device_tree.hp0, "hp0 in the device tree");
    assert.ok(info.config.disks.some((d: { id: string }) => d.id === "hp0"));
  });
  await t.step("remove-device: the guest ejects it; gone from the guest and from the device tree", () => {
    assert.match(section("REMOVE1"), /rc=0/, tail);
    assert.equal(line("gone1"), "yes", tail);
    assert.equal((line("pci2") ?? "").trim(), (line("pci0") ?? "").trim(), tail);
    console.log(`remove-device call → answered (the guest ejected): ${line("remove-ms")} ms`);
    const info = json("INFO2");
    assert.equal(info.device_tree.hp0, undefined);
    assert.ok(!info.config.disks.some((d: { id: string }) => d.id === "hp0"));
  });
  await t.step("the same id is added again and reads its new image; resize-disk grows it", () => {
    assert.match(section("ADD2"), /"id":"hp0"/, tail);
    assert.equal(line("read2"), "TOKEN-HP-BBB", tail);
    assert.match(section("RESIZE"), /rc=0/, tail);
    assert.equal(line("size2"), "8192", tail);
    assert.equal(line("host-size"), "4194304");
    assert.match(section("REMOVE2"), /rc=0/, tail);
  });
  await t.step("20 add/remove cycles: all succeed, no descriptor or thread left behind", () => {
    assert.equal(line("cycles-ok"), "20", tail);
    console.log(`dvmm before the cycles: ${line("before")}; after: ${line("after")}`);
    assert.equal(line("after"), line("before"));
  });
  await t.step("add-net: the guest pings the host through the hot-added NIC; removed again", () => {
    assert.match(section("ADDNET"), /"id":"hpnet"/, tail);
    assert.equal(line("ping-rc"), "0", tail);
    assert.match(section("REMOVENET"), /rc=0/, tail);
    assert.equal(line("netgone"), "yes", tail);
  });
  await t.step("add-pmem: the guest reads the file through /dev/pmem0; removed again", () => {
    assert.match(section("ADDPMEM"), /"id":"hppm"/, `${section("ADDPMEM")}\n${tail}`);
    assert.equal(line("pmem-read"), "TOKEN-HP-PMM", tail);
    assert.match(section("REMOVEPMEM"), /rc=0/, tail);
    assert.equal(line("pmem-gone"), "yes", tail);
  });
  await t.step("vm.resize vCPUs 1 → 3 → 1: the guest's online CPUs follow; threads start and stop", () => {
    console.log(
      `vCPU hotplug latency, resize call → both vCPUs online in the guest: ${line("latency-vcpu-ms")} ms; ` +
        `resize to 1 answered after the guest ejected: ${line("unplug-ms")} ms`,
    );
    assert.match(section("CPUS3"), /rc=0/, tail);
    assert.equal(line("cpus-up"), "0-2 nproc=3", tail);
    assert.equal(line("threads-3"), "3");
    assert.match(section("CPUS1"), /rc=0/, tail);
    assert.equal(line("cpus-down"), "0 nproc=1", tail);
    assert.equal(line("threads-1"), "1");
    const info = json("INFO3");
    assert.equal(info.config.cpus.boot_vcpus, 1);
  });
  await t.step("vm.resize desired_ram +512 MiB (ACPI memory hotplug): the guest's MemTotal follows", () => {
    const before = Number(line("mem-before")), after = Number(line("mem-after"));
    console.log(
      `RAM hotplug, resize call → 512 MiB online in the guest: ${line("latency-ram-ms")} ms; ` +
        `MemTotal ${before} kB → ${after} kB`,
    );
    assert.match(section("RAM"), /rc=0/, tail);
    assert.ok(after - before >= 512000, `${before} → ${after}\n${tail}`);
    const info = json("INFO3");
    assert.equal(info.config.memory.size, 896 * 1024 * 1024);
    assert.equal(info.memory_actual_size, 896 * 1024 * 1024);
    assert.equal(line("dvmm-exit"), "0", tail);
  });
});
