/**
 * Snapshot and restore of the stock Debian guest in the KVM lab:
 *
 * 1. The guest counts once a second, printing `tick N` on its serial port (a terminal here: dvmm's
 *    stdin/stdout), keeping N in tmpfs and on its virtio disk, and has a tap-backed virtio-net up. The
 *    VMM is paused, snapshotted and shut down; a second dvmm restores the snapshot with `resume=on`.
 *    The count goes on from the next number (none lost or repeated), a line typed on the new VMM's
 *    terminal is run by the guest's shell, the disk holds the latest count, and the guest pings the
 *    host over the tap the new VMM re-creates.
 * 2. A 2 GiB guest that has touched 256 MiB: snapshot time and size, then restore latency (from the
 *    event monitor's `restoring` to `restored`, Cloud Hypervisor's restore_latency_time_ms) with memory
 *    copied and mapped on demand; each restored guest is resumed and answers on its terminal.
 */
import assert from "node:assert/strict";
import { labTail, labUnavailable, runScriptInLab, SH_LIB } from "./helpers/lab.ts";

const why = labUnavailable();
const root = new URL("../", import.meta.url).pathname;

const COUNTER = `
ip link set eth0 up; ip addr add 192.168.250.2/24 dev eth0
( i=0; while :; do i=$((i+1)); echo "tick $i"; echo $i >/tmp/count
  echo "disk $i" | dd of=/dev/vda bs=512 count=1 conv=notrunc,fsync 2>/dev/null; sleep 1; done ) &
echo COUNTING
`;

const FILL = `
dd if=/dev/urandom of=/tmp/fill bs=1M count=256 2>/dev/null; echo FILLED
`;

const HOST = (dir: string, counter: string, fill: string) => `
set -u
D=/work/${dir}
K="--kernel /lab/vmlinuz --initramfs /lab/initramfs.gz"
${SH_LIB}
api() { curl -s -o $D/body -w "CALL $2 %{http_code}\\n" --unix-socket $3 -X "$1" -H 'Content-Type: application/json' \${4:+-d "$4"} "http://localhost/api/v1/$2"; cat $D/body; echo; }
ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
# Event-monitor time in ms of the first event named $2 in file $1.
evms() { grep "\\"event\\":\\"$2\\"" $1 | head -n1 | sed -E 's/.*"secs":([0-9]+),"nanos":([0-9]+).*/\\1 \\2/' | awk '{ printf "%d", $1 * 1000 + $2 / 1000000 }'; }

echo "=== CASE count"
dd if=/dev/zero of=$D/disk.img bs=1M count=8 2>/dev/null
mkfifo $D/in.a $D/in.b
dvmm $K --cmdline "console=ttyS0 quiet panic=-1 dvmm.then=shell ${counter}" --cpus boot=2 --memory size=512M \\
  --serial tty --console off --disk path=$D/disk.img \\
  --net tap=dvmmtap5,ip=192.168.250.1,mask=255.255.255.0,mac=52:54:00:12:34:57 \\
  --api-socket path=$D/a.sock <$D/in.a >$D/a.out 2>$D/a.err &
pa=$!
exec 3>$D/in.a
waitfor $D/a.out "tick 4" 600 $pa || echo "NO-TICKS"
api PUT vm.pause $D/a.sock
t0=$(ms)
api PUT vm.snapshot $D/a.sock '{"destination_url":"file://'$D'/snap"}'
echo "SNAPSHOT-MS $(( $(ms) - t0 ))"
echo "DISK-AT-SNAP $(head -c 16 $D/disk.img | tr -d '\\0')"
api PUT vmm.shutdown $D/a.sock
reap $pa a 60
exec 3>&-
dvmm --restore source_url=file://$D/snap,resume=on --api-socket path=$D/b.sock --event-monitor path=$D/b.ev \\
  <$D/in.b >$D/b.out 2>$D/b.err &
pb=$!
exec 4>$D/in.b
waitfor $D/b.out "tick" 600 $pb || echo "NO-TICKS-AFTER"
sleep 2
printf 'echo "count-now $(cat /tmp/count)"; echo "disk-now $(head -c 16 /dev/vda | tr -d "\\\\0")"; ping -c 3 -W 5 192.168.250.1 >/dev/null 2>&1; echo "ping-rc $?"; echo "serial-ok-$((6*7))"\\n' >&4
waitfor $D/b.out "serial-ok-42" 240 $pb || echo "NO-SERIAL"
api GET vm.info $D/b.sock | grep -o '"state":"[A-Za-z]*"'
api PUT vmm.shutdown $D/b.sock
reap $pb b 60
exec 4>&-
echo "=== A-OUT"; tr -d '\\r' <$D/a.out | grep -v "^$"
echo "=== B-OUT"; tr -d '\\r' <$D/b.out | grep -v "^$"
echo "=== B-EV"; cat $D/b.ev
echo "=== ERR"; tail -5 $D/a.err $D/b.err
echo "=== END count"

echo "=== CASE latency"
mkfifo $D/in.c
dvmm $K --cmdline "console=ttyS0 quiet panic=-1 dvmm.then=shell ${fill}" --cpus boot=1 --memory size=2G \\
  --serial tty --console off --api-socket path=$D/c.sock <$D/in.c >$D/c.out 2>$D/c.err &
pc=$!
exec 5>$D/in.c
waitfor $D/c.out FILLED 900 $pc || echo "NO-FILL"
api PUT vm.pause $D/c.sock
t0=$(ms)
api PUT vm.snapshot $D/c.sock '{"destination_url":"file://'$D'/big"}'
echo "BIG-SNAPSHOT-MS $(( $(ms) - t0 ))"
echo "BIG-SIZE-KB $(du -k $D/big/memory | cut -f1) APPARENT-KB $(( $(stat -c %s $D/big/memory) / 1024 ))"
api PUT vmm.shutdown $D/c.sock
reap $pc c 60
exec 5>&-
for mode in copy ondemand; do
  rm -f $D/in.r; mkfifo $D/in.r
  dvmm --restore source_url=file://$D/big,memory_restore_mode=$mode,resume=on --api-socket path=$D/r.sock \\
    --event-monitor path=$D/r.$mode.ev <$D/in.r >$D/r.$mode.out 2>$D/r.$mode.err &
  pr=$!
  exec 6>$D/in.r
  waitfor $D/r.$mode.ev '"resumed"' 600 $pr || echo "NOT-RESUMED $mode"
  echo "RESTORE $mode $(( $(evms $D/r.$mode.ev restored) - $(evms $D/r.$mode.ev restoring) )) ms"
  printf 'echo "alive-$((40+2))"; ls -l /tmp/fill | wc -l\\n' >&6
  waitfor $D/r.$mode.out "alive-42" 240 $pr && echo "ANSWERS $mode" || { echo "SILENT $mode"; tail -5 $D/r.$mode.err; }
  echo "RSS $mode $(grep VmRSS /proc/$pr/status | awk '{print $2}') kB"
  api PUT vmm.shutdown $D/r.sock >/dev/null
  reap $pr r-$mode 60
  exec 6>&-
done
echo "=== END latency"
`;

Deno.test({
  name: "lab: snapshot, shut down, restore in a new dvmm: the count goes on, serial, disk and net work",
  ignore: why !== null,
}, async (t) => {
  const arg = async (script: string) =>
    new TextDecoder().decode(
      (await new Deno.Command(`${root}tests/lab/guest-arg`, { args: [script] }).output()).stdout,
    ).trim();
  const counter = await arg(COUNTER);
  const fill = await arg(FILL);
  const res = await runScriptInLab("snapshot", {}, (name) => HOST(name, counter, fill), { timeout: 450 });
  const out = res.stdout.replaceAll("\r", "");
  const all = out + "\n--- stderr ---\n" + res.stderr;
  const tail = labTail(res, out);
  await Deno.writeTextFile(`${root}build/lab-work/snapshot.out`, all);
  const section = (s: string) => out.split(`=== ${s}\n`)[1]?.split("\n=== ")[0] ?? "";
  const calls = (ep: string) => [...out.matchAll(new RegExp(`^CALL ${ep} (\\d+)$`, "gm"))].map((m) => m[1]);

  await t.step("pause, snapshot and shutdown answer 204; the first VMM exits 0", () => {
    assert.deepEqual(calls("vm.pause"), ["204", "204"], tail(6000));
    assert.deepEqual(calls("vm.snapshot"), ["204", "204"], tail(6000));
    assert.match(out, /^a-exit 0$/m);
  });
  await t.step("the restored guest counts on from the next number: none lost, none repeated", () => {
    // A tick may share its line with the shell's prompt (and the terminal query it prints).
    const ticks = (s: string) => [...section(s).matchAll(/tick (\d+)$/gm)].map((m) => Number(m[1]));
    const a = ticks("A-OUT");
    const b = ticks("B-OUT");
    assert.ok(a.length >= 4 && b.length >= 1, `ticks ${a} / ${b}\n${tail(6000)}`);
    assert.equal(b[0], a[a.length - 1] + 1, `A ended at ${a.at(-1)}, B began at ${b[0]}`);
    b.forEach((n, i) => i > 0 && assert.equal(n, b[i - 1] + 1));
  });
  await t.step(
    "the new VMM's terminal reaches the guest's shell; tmpfs, disk and the re-created tap work",
    () => {
      const b = section("B-OUT");
      assert.match(b, /^serial-ok-42$/m, tail(6000));
      const now = Number(b.match(/^count-now (\d+)$/m)?.[1]);
      const disk = Number(b.match(/^disk-now disk (\d+)/m)?.[1]);
      const atSnap = Number(out.match(/^DISK-AT-SNAP disk (\d+)/m)?.[1]);
      assert.ok(now > atSnap, `count ${now} after the snapshot's ${atSnap}`);
      // The two readings are a few commands apart and the counter writes /tmp/count before the disk: the
      // disk may be one behind the count read before it, or one ahead when a tick came in between.
      assert.ok(Math.abs(disk - now) <= 1, `the disk holds the latest count (${disk} vs ${now})`);
      assert.match(b, /^ping-rc 0$/m);
      assert.match(out, /"state":"Running"/);
      assert.match(section("B-EV"), /"restoring"[\s\S]*"restored"[\s\S]*"resumed"/);
      assert.match(out, /^b-exit 0$/m);
    },
  );
  await t.step(
    "a 2 GiB guest that touched 256 MiB: sparse snapshot; copy and on-demand restores answer",
    () => {
      const kb = Number(out.match(/^BIG-SIZE-KB (\d+)/m)?.[1]);
      const apparent = Number(out.match(/APPARENT-KB (\d+)/m)?.[1]);
      assert.ok(apparent >= 2 * 1024 * 1024, `the memory file spans the guest's RAM (${apparent} kB)`);
      assert.ok(kb < 1024 * 1024, `only touched memory is written (${kb} kB on disk)`);
      assert.match(out, /^ANSWERS copy$/m, tail(4000));
      assert.match(out, /^ANSWERS ondemand$/m, tail(4000));
      for (const line of out.match(/^(BIG-|SNAPSHOT-MS|RESTORE|RSS).*$/gm) ?? []) console.log(`  ${line}`);
    },
  );
});
