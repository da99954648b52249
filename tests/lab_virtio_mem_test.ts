/**
 * virtio-mem in the KVM lab with the stock guest and its own virtio_mem driver: a 384 MiB VM with
 * `hotplug_method=virtio-mem,hotplug_size=1G`; `vm.resize desired_ram` to 896 MiB makes the guest plug
 * 512 MiB (its MemTotal grows once the blocks are online: busybox has no udev, so the guest onlines them,
 * as movable so they can go again), then back to 384 MiB: the guest unplugs them and MemTotal shrinks.
 * vm.info's memory_actual_size and the device's counters follow, and dvmm's RSS drops after the unplug.
 * Then memory zones: 256 MiB + 128 MiB (shared, 512 MiB hotplug), and vm.resize-zone grows the second.
 */
import assert from "node:assert/strict";
import { labTail, labUnavailable, runScriptInLab, scriptDisk } from "./helpers/lab.ts";

const why = labUnavailable();

const GUEST = `
exec >/dev/hvc0 2>&1
mt() { awk '/^MemTotal:/{print $2}' /proc/meminfo; }
online() { for f in /sys/devices/system/memory/memory*/state; do [ "$(cat $f)" = offline ] && echo online_movable >$f 2>/dev/null; done; }
m0=$(mt); echo "mem-boot $m0"
echo MARK-ready
i=0; while [ $(mt) -lt $((m0 + 500000)) ] && [ $i -lt 2400 ]; do online; usleep 50000; i=$((i+1)); done
echo "mem-grown $(mt)"
dd if=/dev/zero of=/tmp/fill bs=1M count=256 2>/dev/null; rm -f /tmp/fill
# Freed pages can sit on per-CPU lists for a while; a busy block makes the driver back off (50 s, then
# doubling up to 300 s), so give the unplug free blocks from the start.
sync; echo 3 >/proc/sys/vm/drop_caches
echo MARK-grown
# The figure is the one that ended the wait: while the driver offlines a memory block whose sub-blocks it
# has already unplugged, MemTotal counts that block again for a moment (128 MiB), so a second reading
# taken then says nothing about the unplug.
i=0; while m=$(mt); [ "$m" -gt $((m0 + 16384)) ] && [ $i -lt 4800 ]; do usleep 50000; i=$((i+1)); done
echo "mem-shrunk $m"
dmesg | grep -i virtio_mem | tail -n 8
read -t 300 -r l </dev/hvc0
echo MARK-done
`;

/** The zones guest: its RAM at boot, then the second zone grown by 512 MiB (onlined by hand). */
const ZONES_GUEST = `
exec >/dev/hvc0 2>&1
mt() { awk '/^MemTotal:/{print $2}' /proc/meminfo; }
online() { for f in /sys/devices/system/memory/memory*/state; do [ "$(cat $f)" = offline ] && echo online_movable >$f 2>/dev/null; done; }
m0=$(mt); echo "zmem-boot $m0"
echo MARK-ready
i=0; while [ $(mt) -lt $((m0 + 500000)) ] && [ $i -lt 2400 ]; do online; usleep 50000; i=$((i+1)); done
echo "mem-grown $(mt)"
read -t 300 -r l </dev/hvc0
echo MARK-done
`;

const HOST = (dir: string) => `
set -u
D=/work/${dir}
now() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
waitfor() {
  i=0
  while ! grep -q "$1" $D/out.txt 2>/dev/null; do
    i=$((i+1))
    if [ $i -gt 30000 ]; then echo "timeout waiting for $1"; return 1; fi
    if ! kill -0 $pid 2>/dev/null; then echo "dvmm exited before $1"; return 1; fi
    sleep 0.02
  done
}
put() { curl -s --unix-socket $D/api.sock -X PUT -H 'Content-Type: application/json' -d "$2" "http://localhost/api/v1/$1"; echo " rc=$?"; }
get() { curl -s --unix-socket $D/api.sock "http://localhost/api/v1/$1"; echo; }
rss() { awk '/^VmRSS:/{print $2}' /proc/$pid/status; }
mkfifo $D/in; exec 3<>$D/in
dvmm --kernel /lab/vmlinuz --initramfs /lab/initramfs.gz \\
  --cmdline "console=ttyS0 panic=-1 dvmm.script=/dev/vda" \\
  --cpus boot=2 --memory size=384M,hotplug_method=virtio-mem,hotplug_size=1G --serial null --console tty \\
  --disk path=$D/guest.sh,readonly=on \\
  --api-socket path=$D/api.sock <&3 >$D/out.txt 2>$D/err.txt &
pid=$!
if waitfor MARK-ready; then
  t0=$(now)
  echo "=== GROW"; put vm.resize '{"desired_ram":939524096}'
  waitfor mem-grown && echo "latency-grow-ms $(( $(now) - t0 ))"
  waitfor MARK-grown
  echo "rss-grown $(rss)"
  echo "=== INFO1"; get vm.info
  echo "=== COUNTERS1"; get vm.counters
  t0=$(now)
  echo "=== SHRINK"; put vm.resize '{"desired_ram":402653184}'
  waitfor mem-shrunk && echo "latency-shrink-ms $(( $(now) - t0 ))"
  sleep 1
  echo "rss-shrunk $(rss)"
  echo "=== INFO2"; get vm.info
  echo "=== COUNTERS2"; get vm.counters
  echo go >&3
  waitfor MARK-done
fi
wait $pid
echo "dvmm-exit $?"
echo "=== OUT"; cat $D/out.txt
echo "=== ERR"; cat $D/err.txt

# Memory zones: 256 MiB + 128 MiB (shared, with 512 MiB of virtio-mem); vm.resize-zone grows the second.
rm -f $D/api.sock $D/out.txt
dvmm --kernel /lab/vmlinuz --initramfs /lab/initramfs.gz \\
  --cmdline "console=ttyS0 panic=-1 dvmm.script=/dev/vda" \\
  --cpus boot=2 --memory size=0,hotplug_method=virtio-mem \\
  --memory-zone id=z0,size=256M --memory-zone id=z1,size=128M,shared=on,hotplug_size=512M \\
  --serial null --console tty --disk path=$D/zones.sh,readonly=on \\
  --api-socket path=$D/api.sock <&3 >$D/out.txt 2>$D/err.txt &
pid=$!
if waitfor MARK-ready; then
  echo "=== ZGROW"; put vm.resize-zone '{"id":"z1","desired_ram":671088640}'
  waitfor mem-grown
  echo "=== ZINFO"; get vm.info
  echo go >&3
  waitfor MARK-done
fi
wait $pid
echo "zones-exit $?"
echo "=== ZOUT"; cat $D/out.txt
echo "=== ZERR"; cat $D/err.txt
`;

Deno.test({
  name: "lab: virtio-mem: vm.resize grows the guest by 512 MiB and shrinks it back (its own driver)",
  ignore: why !== null,
}, async (t) => {
  const res = await runScriptInLab(
    "virtiomem",
    { "guest.sh": scriptDisk(GUEST), "zones.sh": scriptDisk(ZONES_GUEST) },
    HOST,
    { timeout: 400 },
  );
  const out = res.stdout.replaceAll("\r", "");
  const all = out + "\n--- stderr ---\n" + res.stderr;
  const tail = labTail(res, out)(8000);
  const line = (key: string) => out.match(new RegExp(`^${key} ?(.*)$`, "m"))?.[1];
  // The guest's figures share hvc0 with the kernel's messages, which may land on the same line.
  const num = (key: string) => Number(out.match(new RegExp(`${key} (\\d+)`))?.[1]);
  const section = (s: string) => out.split(`=== ${s}\n`)[1]?.split("\n=== ")[0] ?? "";
  const json = (s: string) => {
    try {
      return JSON.parse(section(s).trim().split("\n")[0]);
    } catch {
      assert.fail(`${s} is not JSON:\n${tail}`);
    }
  };
  if (Deno.env.get("DVMM_LAB_VERBOSE") === "1") console.log(all);
  const MiB = 1 << 20;

  await t.step("grow: the guest plugs 512 MiB; MemTotal, memory_actual_size and the config follow", () => {
    const boot = num("mem-boot"), grown = num("mem-grown");
    console.log(
      `virtio-mem grow to 896 MiB: MemTotal ${boot} → ${grown} kB in ${line("latency-grow-ms")} ms ` +
        `(resize call → memory online in the guest)`,
    );
    assert.match(section("GROW"), /rc=0/, tail);
    assert.ok(grown - boot >= 500000, `${boot} → ${grown}\n${tail}`);
    const info = json("INFO1");
    assert.equal(info.memory_actual_size, 896 * MiB);
    assert.equal(info.config.memory.size, 384 * MiB);
    assert.equal(info.config.memory.hotplugged_size, 512 * MiB);
    assert.ok(json("COUNTERS1").mem0.plug_requests >= 1);
  });
  await t.step("shrink: the guest unplugs them; MemTotal and memory_actual_size come back; RSS drops", () => {
    const boot = num("mem-boot"), shrunk = num("mem-shrunk");
    console.log(
      `virtio-mem shrink to 384 MiB: MemTotal ${shrunk} kB in ${line("latency-shrink-ms")} ms; ` +
        `dvmm RSS ${line("rss-grown")} → ${line("rss-shrunk")} kB`,
    );
    assert.match(section("SHRINK"), /rc=0/, tail);
    const driver = out.split("\n").filter((l) => /virtio_mem/i.test(l)).join("\n");
    assert.ok(shrunk - boot <= 16384, `${boot} → ${shrunk} kB; the guest's driver said:\n${driver}\n${tail}`);
    const info = json("INFO2");
    assert.equal(info.memory_actual_size, 384 * MiB);
    assert.equal(info.config.memory.hotplugged_size, undefined);
    assert.ok(json("COUNTERS2").mem0.unplug_requests >= 1);
    assert.ok(Number(line("rss-grown")) - Number(line("rss-shrunk")) >= 128 * 1024, tail);
    assert.equal(line("dvmm-exit"), "0", tail);
  });
  await t.step("memory zones: the guest has both zones' RAM; vm.resize-zone grows the second", () => {
    const zout = section("ZOUT");
    const boot = Number(zout.match(/zmem-boot (\d+)/)?.[1]);
    const grown = Number(zout.match(/mem-grown (\d+)/)?.[1]);
    console.log(
      `memory zones 256 MiB + 128 MiB: MemTotal ${boot} kB; after resize-zone z1 to 640 MiB: ${grown} kB`,
    );
    assert.ok(boot > 300 * 1024 && boot <= 384 * 1024, `${boot}\n${tail}`);
    assert.match(section("ZGROW"), /rc=0/, tail);
    assert.ok(grown - boot >= 500000, `${boot} → ${grown}\n${tail}`);
    const info = json("ZINFO");
    assert.equal(info.memory_actual_size, 896 * MiB);
    assert.equal(info.config.memory.zones[1].hotplugged_size, 512 * MiB);
    assert.equal(line("zones-exit"), "0", tail);
  });
});
