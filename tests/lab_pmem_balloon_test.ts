/**
 * virtio-pmem and virtio-balloon in the KVM lab, the stock guest, two boots in one lab run:
 *
 * 1. pmem: two 4 MiB images with a token each, `--pmem file=A` and `--pmem file=B,discard_writes=on`.
 *    The guest finds the tokens at the start of /dev/pmem0 and /dev/pmem1, writes a token of its own
 *    into each (dd conv=fsync: the block device flush becomes a virtio-pmem FLUSH) and reads it back
 *    with the page cache dropped. Afterwards A holds the guest's token on the host; B is unchanged.
 * 2. balloon: 384 MiB with `--balloon size=128M,free_page_reporting=on`. The guest's MemTotal drops by
 *    the balloon; vm.counters / vm.info show its actual size; `resize --balloon 64M` deflates it
 *    (MemTotal grows back). Then the guest fills 96 MiB of tmpfs and deletes it: with free page
 *    reporting the freed pages go back to the host, and dvmm's RSS (sampled here) goes down.
 *
 * The guests take their scripts from a raw disk (dvmm.script=/dev/vda): too long for the command line.
 * The guests talk on hvc0 (stdout → a file here) and wait for a line from the host at each step, so
 * the lab shell can look at counters, info and RSS while the guest holds still.
 */
import assert from "node:assert/strict";
import { labTail, labUnavailable, runScriptInLab, scriptDisk } from "./helpers/lab.ts";

const why = labUnavailable();
const MiB = 1 << 20;

function image(token: string): Uint8Array {
  const b = new Uint8Array(4 * MiB);
  b.set(new TextEncoder().encode(token));
  b.fill(0x2e, 4096, 4 * MiB); // '.': the pages after the token's hold data too
  return b;
}

const PMEM_GUEST = `
exec >/dev/hvc0 2>&1
i=0; while [ ! -b /dev/pmem1 ] && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done
ls -l /dev/pmem* 2>&1
for d in /dev/pmem0 /dev/pmem1; do
  t=$(head -c 12 $d)
  echo "read $d $t"
  case $t in TOKEN-HOST-A) w=GUEST-WROTE-A ;; TOKEN-HOST-B) w=GUEST-WROTE-B ;; *) continue ;; esac
  printf $w | dd of=$d bs=4096 seek=1 conv=notrunc,fsync 2>/dev/null; echo "dd $d $?"
  sync; echo 3 >/proc/sys/vm/drop_caches
  echo "back $d $(dd if=$d bs=4096 skip=1 count=1 2>/dev/null | head -c 13)"
  echo "tail $d $(dd if=$d bs=4096 skip=1023 count=1 2>/dev/null | head -c 4)"
done
echo "sectors $(cat /sys/block/pmem0/size) $(cat /sys/block/pmem1/size)"
dmesg | grep -i -E 'pmem|nvdimm|nd_' | tail -n 8
echo MARK-pmem-done
read -t 300 -r l </dev/hvc0
`;

const BALLOON_GUEST = `
exec >/dev/hvc0 2>&1
mt() { awk '/^MemTotal:/{print $2}' /proc/meminfo; }
mem() { echo "mem-$1 $(awk '/^(MemTotal|MemFree|MemAvailable):/{printf "%s %s ", $1, $2}' /proc/meminfo)"; }
waitmt() { i=0; while [ $i -lt 240 ]; do t=$(mt); [ "$1" = lt ] && [ $t -lt $2 ] && return 0; [ "$1" = gt ] && [ $t -gt $2 ] && return 0; sleep 1; i=$((i+1)); done; echo "waitmt $1 $2 timed out"; }
waitmt lt 262144
sleep 3
mem inflated; free -m
m0=$(mt)
echo MARK-inflated
read -t 300 -r l </dev/hvc0
waitmt gt $((m0 + 61440))
sleep 3
mem deflated; free -m
echo MARK-deflated
read -t 300 -r l </dev/hvc0
dd if=/dev/zero of=/tmp/fill bs=1M count=96 2>/dev/null; sync
mem filled
echo MARK-filled
read -t 300 -r l </dev/hvc0
rm -f /tmp/fill
mem freed
echo MARK-freed
read -t 300 -r l </dev/hvc0
mem end
`;

const HOST = (dir: string) => `
set -u
D=/work/${dir}
waitfor() { # file pattern
  i=0
  while ! grep -q "$2" $D/$1 2>/dev/null; do
    i=$((i+1))
    if [ $i -gt 900 ]; then echo "timeout waiting for $2"; return 1; fi
    if ! kill -0 $pid 2>/dev/null; then echo "dvmm exited before $2"; return 1; fi
    sleep 0.5
  done
}
api() { dvmm remote --api-socket $D/$1 $2; echo; }
rss() { awk '/^VmRSS:/{print $2}' /proc/$pid/status; }
GUEST="console=ttyS0 console=hvc0 panic=-1 dvmm.script=/dev/vda"

# ---- 1: pmem
mkfifo $D/in1; exec 3<>$D/in1
dvmm --kernel /lab/vmlinuz --initramfs /lab/initramfs.gz --cmdline "$GUEST" \\
  --cpus boot=2 --memory size=384M --serial null --console tty \\
  --disk path=$D/pmem.sh,readonly=on \\
  --pmem file=$D/a.img --pmem file=$D/b.img,discard_writes=on \\
  --api-socket path=$D/api1.sock <&3 >$D/out1.txt 2>$D/err1.txt &
pid=$!
if waitfor out1.txt MARK-pmem-done; then
  echo "=== P-COUNTERS"; api api1.sock counters
  echo "=== P-INFO"; api api1.sock info
  echo go >&3
fi
wait $pid
echo "pmem-dvmm-exit $?"
echo "host-a $(head -c 12 $D/a.img) $(dd if=$D/a.img bs=4096 skip=1 count=1 2>/dev/null | head -c 13)"
echo "host-b $(head -c 12 $D/b.img) $(dd if=$D/b.img bs=4096 skip=1 count=1 2>/dev/null | head -c 13)"
echo "host-b-sum $(md5sum < $D/b.img | cut -d' ' -f1)"
echo "=== P-OUT"; cat $D/out1.txt
echo "=== P-ERR"; cat $D/err1.txt
exec 3>&-

# ---- 2: balloon
mkfifo $D/in2; exec 3<>$D/in2
dvmm --kernel /lab/vmlinuz --initramfs /lab/initramfs.gz --cmdline "$GUEST" \\
  --cpus boot=2 --memory size=384M --serial null --console tty \\
  --disk path=$D/balloon.sh,readonly=on \\
  --balloon size=128M,free_page_reporting=on \\
  --api-socket path=$D/api2.sock <&3 >$D/out2.txt 2>$D/err2.txt &
pid=$!
if waitfor out2.txt MARK-inflated; then
  echo "rss-inflated $(rss)"
  echo "=== B-COUNTERS1"; api api2.sock counters
  echo "=== B-INFO1"; api api2.sock info
  dvmm remote --api-socket $D/api2.sock resize --balloon 64M; echo "resize-rc $?"
  echo go >&3
fi
if waitfor out2.txt MARK-deflated; then
  echo "rss-deflated $(rss)"
  echo "=== B-COUNTERS2"; api api2.sock counters
  echo "=== B-INFO2"; api api2.sock info
  echo go >&3
fi
if waitfor out2.txt MARK-filled; then
  sleep 2
  echo "rss-filled $(rss)"
  echo "=== B-COUNTERS3"; api api2.sock counters
  echo go >&3
fi
if waitfor out2.txt MARK-freed; then
  min=$(rss); i=0
  while [ $i -lt 45 ]; do
    sleep 1; r=$(rss); echo "rss-sample $i $r"; [ $r -lt $min ] && min=$r; i=$((i+1))
  done
  echo "rss-freed $min"
  echo "=== B-COUNTERS4"; api api2.sock counters
  echo go >&3
fi
wait $pid
echo "balloon-dvmm-exit $?"
echo "=== B-OUT"; cat $D/out2.txt
echo "=== B-ERR"; cat $D/err2.txt
`;

Deno.test({
  name:
    "lab: virtio-pmem (shared and discard_writes) and virtio-balloon (inflate, deflate, free page reporting)",
  ignore: why !== null,
}, async (t) => {
  const res = await runScriptInLab(
    "pmemballoon",
    {
      "a.img": image("TOKEN-HOST-A"),
      "b.img": image("TOKEN-HOST-B"),
      "pmem.sh": scriptDisk(PMEM_GUEST),
      "balloon.sh": scriptDisk(BALLOON_GUEST),
    },
    HOST,
    { timeout: 700 },
  );
  const out = res.stdout.replaceAll("\r", "");
  const all = out + "\n--- stderr ---\n" + res.stderr;
  const tail = labTail(res, out);
  const line = (key: string) => out.match(new RegExp(`^${key} ?(.*)$`, "m"))?.[1];
  const section = (s: string) => out.split(`=== ${s}\n`)[1]?.split("\n=== ")[0] ?? "";
  const json = (s: string) => {
    try {
      return JSON.parse(section(s).trim().split("\n")[0]); // one line of JSON
    } catch {
      assert.fail(`${s} is not JSON:\n${tail(8000)}`);
    }
  };
  const kb = (key: string) => Number(line(key));
  const memLine = (phase: string) => {
    const m = line(`mem-${phase}`) ?? "";
    const v = (k: string) => Number(m.match(new RegExp(`${k}: (\\d+)`))?.[1]);
    return { total: v("MemTotal"), free: v("MemFree"), available: v("MemAvailable") };
  };
  if (Deno.env.get("DVMM_LAB_VERBOSE") === "1") console.log(all);

  await t.step("pmem: the guest reads the host's bytes from /dev/pmem0 and /dev/pmem1", () => {
    const reads = [...out.matchAll(/^read (\/dev\/pmem\d) (.*)$/gm)].map((m) => m[2]).sort();
    assert.deepEqual(reads, ["TOKEN-HOST-A", "TOKEN-HOST-B"], tail(8000));
    assert.match(out, /^sectors 8192 8192$/m);
    for (const m of out.matchAll(/^tail \/dev\/pmem\d (.*)$/gm)) assert.equal(m[1], "....");
  });
  await t.step("pmem: the guest's writes read back in the guest, both devices", () => {
    const back = [...out.matchAll(/^back \/dev\/pmem\d (.*)$/gm)].map((m) => m[1]).sort();
    assert.deepEqual(back, ["GUEST-WROTE-A", "GUEST-WROTE-B"], tail(8000));
    for (const m of out.matchAll(/^dd \/dev\/pmem\d (\d+)$/gm)) assert.equal(m[1], "0");
  });
  await t.step("pmem: the shared file has the guest's write; the discard_writes file is unchanged", () => {
    assert.equal(line("host-a"), "TOKEN-HOST-A GUEST-WROTE-A", tail(8000));
    assert.equal(line("host-b"), "TOKEN-HOST-B " + ".".repeat(13), tail(8000));
    assert.equal(line("pmem-dvmm-exit"), "0");
  });
  await t.step("pmem: counters (flushes), device tree (memory range, PCI ids)", () => {
    const c = json("P-COUNTERS");
    assert.ok(c._pmem1.flush_ops >= 1, JSON.stringify(c));
    assert.ok(c._pmem2.flush_ops >= 1, JSON.stringify(c));
    assert.equal(c._pmem1.flush_errors, 0);
    const info = json("P-INFO");
    const [a, b] = [info.device_tree._pmem1, info.device_tree._pmem2];
    assert.deepEqual(a.resources, [{ MmioAddressRange: { base: 2 ** 32, size: 4 * MiB } }]);
    assert.deepEqual(b.resources, [{ MmioAddressRange: { base: 2 ** 32 + 4 * MiB, size: 4 * MiB } }]);
    assert.equal(info.config.pmem[1].discard_writes, true);
    assert.equal(info.config.pmem[0].id, "_pmem1");
  });

  await t.step("balloon: inflated to 128 MiB, the guest's MemTotal shows it; counters and info agree", () => {
    const m = memLine("inflated");
    console.log(`guest with a 128 MiB balloon: MemTotal ${m.total} kB, MemFree ${m.free} kB`);
    assert.ok(m.total < 256 * 1024 && m.total > 150 * 1024, tail(8000));
    const c = json("B-COUNTERS1").__balloon;
    console.log(`vm.counters __balloon: ${JSON.stringify(c)}`);
    assert.equal(c.actual_bytes, 128 * MiB);
    assert.equal(c.target_bytes, 128 * MiB);
    assert.ok(c.inflated_bytes >= 128 * MiB);
    const info = json("B-INFO1");
    assert.equal(info.memory_actual_size, 256 * MiB);
    assert.equal(info.config.balloon.size, 128 * MiB);
    assert.equal(info.config.balloon.free_page_reporting, true);
    assert.ok(info.device_tree.__balloon);
  });
  await t.step("balloon: resize to 64 MiB deflates it; MemTotal grows back", () => {
    assert.equal(line("resize-rc"), "0", tail(8000));
    const before = memLine("inflated"), after = memLine("deflated");
    console.log(`guest after resize to 64 MiB: MemTotal ${after.total} kB, MemFree ${after.free} kB`);
    assert.ok(after.total - before.total >= 60 * 1024, `${before.total} → ${after.total}`);
    const c = json("B-COUNTERS2").__balloon;
    assert.equal(c.actual_bytes, 64 * MiB);
    assert.ok(c.deflated_bytes >= 64 * MiB);
    const info = json("B-INFO2");
    assert.equal(info.memory_actual_size, 320 * MiB);
    assert.equal(info.config.balloon.size, 64 * MiB);
  });
  await t.step("balloon: free page reporting gives freed guest memory back (dvmm's RSS goes down)", () => {
    const filled = kb("rss-filled"), freed = kb("rss-freed");
    console.log(
      `dvmm RSS: inflated ${kb("rss-inflated")} kB, deflated ${kb("rss-deflated")} kB, ` +
        `after the guest filled 96 MiB ${filled} kB, after it freed them ${freed} kB ` +
        `(-${((filled - freed) / 1024).toFixed(1)} MiB)`,
    );
    const c3 = json("B-COUNTERS3").__balloon, c4 = json("B-COUNTERS4").__balloon;
    console.log(`reported_bytes: ${c3.reported_bytes} before the free, ${c4.reported_bytes} after`);
    assert.ok(c4.reported_bytes - c3.reported_bytes >= 48 * MiB, JSON.stringify(c4));
    assert.ok(filled - freed >= 48 * 1024, `RSS ${filled} kB → ${freed} kB\n${tail(6000)}`);
    assert.equal(line("balloon-dvmm-exit"), "0");
  });
});
