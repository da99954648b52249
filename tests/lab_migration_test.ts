/**
 * Live migration of the stock Debian guest in the KVM lab, while it counts (a `tick N` line a second on
 * its serial port, N also kept in tmpfs and on its virtio disk), hop after hop:
 *
 *   A → B over `unix:`, B → C over `tcp:127.0.0.1:PORT`, C → D with `local=true` (the memfds handed over,
 *   guest memory is shared=on throughout).
 *
 * Each source exits 0 after its hop and each destination serves the API with the VM Running; the ticks
 * go on across all hops with none lost or repeated; D's terminal reaches the guest's shell, whose disk
 * holds the latest count. Then a receiver killed in the middle of a migration leaves D running. The
 * sources' `migration-finished` events carry each hop's total time and downtime.
 */
import assert from "node:assert/strict";
import { labTail, labUnavailable, runScriptInLab, SH_LIB } from "./helpers/lab.ts";

const why = labUnavailable();
const root = new URL("../", import.meta.url).pathname;

const COUNTER = `
( i=0; while :; do i=$((i+1)); echo "tick $i"; echo $i >/tmp/count
  echo "disk $i" | dd of=/dev/vda bs=512 count=1 conv=notrunc,fsync 2>/dev/null; sleep 1; done ) &
echo COUNTING
`;

const HOST = (dir: string, counter: string) => `
set -u
D=/work/${dir}
${SH_LIB}
api() { curl -s -o $D/body -w "CALL $2 %{http_code}\\n" --unix-socket $3 -X "$1" -H 'Content-Type: application/json' \${4:+-d "$4"} "http://localhost/api/v1/$2"; cat $D/body; echo; }
ticks() { tr -d '\\r' <$1 | grep -o 'tick [0-9]*$' | tail -n1; }
# A destination dvmm: its own terminal (a fifo in, a file out), API and event monitor.
dest() { mkfifo $D/in.$1; dvmm --api-socket path=$D/$1.sock --event-monitor path=$D/$1.ev <$D/in.$1 >$D/$1.out 2>$D/$1.err & eval "p$1=$!"
  eval "exec $2>$D/in.$1"; i=0; while [ ! -S $D/$1.sock ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done; }
# hop FROM TO URL [LOCAL]: TO receives on URL, FROM sends there; both calls answer 204 when it worked.
hop() {
  api PUT vm.receive-migration $D/$2.sock '{"receiver_url":"'$3'"}' >$D/recv.$2 &
  r=$!
  sleep 3
  echo "LAST-TICK $1 $(ticks $D/$1.out)"
  api PUT vm.send-migration $D/$1.sock '{"destination_url":"'$3'"'\${4:+,\\"local\\":true}'}'
  wait $r; cat $D/recv.$2
  eval "reap \\$p$1 $1 60"
  grep -o '"event":"migration-finished".*' $D/$1.ev
}

dd if=/dev/zero of=$D/disk.img bs=1M count=8 2>/dev/null
mkfifo $D/in.a
dvmm --kernel /lab/vmlinuz --initramfs /lab/initramfs.gz --cmdline "console=ttyS0 quiet panic=-1 dvmm.then=shell ${counter}" \\
  --cpus boot=2 --memory size=512M,shared=on --serial tty --console off --disk path=$D/disk.img \\
  --api-socket path=$D/a.sock --event-monitor path=$D/a.ev <$D/in.a >$D/a.out 2>$D/a.err &
pa=$!
exec 3>$D/in.a
waitfor $D/a.out "tick 3" 600 $pa || echo "NO-TICKS"
dest b 4
echo "=== HOP unix"
hop a b "unix:$D/mig-ab.sock"
waitfor $D/b.out "tick" 240 $pb || echo "NO-TICKS-B"
dest c 5
echo "=== HOP tcp"
hop b c "tcp:127.0.0.1:6123"
waitfor $D/c.out "tick" 240 $pc || echo "NO-TICKS-C"
dest d 6
echo "=== HOP local"
hop c d "unix:$D/mig-cd.sock" local
waitfor $D/d.out "tick" 240 $pd || echo "NO-TICKS-D"
sleep 2
printf 'echo "count-now $(cat /tmp/count)"; echo "disk-now $(head -c 16 /dev/vda | tr -d "\\\\0")"; echo "serial-ok-$((6*7))"\\n' >&6
waitfor $D/d.out "serial-ok-42" 240 $pd || echo "NO-SERIAL"
api GET vm.info $D/d.sock | grep -o '"state":"[A-Za-z]*"'
echo "=== KILLED-RECEIVER"
dest e 7
api PUT vm.receive-migration $D/e.sock '{"receiver_url":"unix:'$D'/mig-de.sock"}' >/dev/null &
sleep 3
( sleep 1; kill -9 $pe ) &
api PUT vm.send-migration $D/d.sock '{"destination_url":"unix:'$D'/mig-de.sock"}'
sleep 3
before=$(ticks $D/d.out)
sleep 3
echo "D-AFTER $before / $(ticks $D/d.out)"
api GET vm.info $D/d.sock | grep -o '"state":"[A-Za-z]*"'
api PUT vmm.shutdown $D/d.sock
reap $pd d 60
for x in a b c d; do echo "=== OUT $x"; tr -d '\\r' <$D/$x.out | grep -o 'tick [0-9]*$\\|^count-now.*\\|^disk-now.*\\|^serial-ok.*'; done
echo "=== ERR"; tail -n 5 $D/a.err $D/b.err $D/c.err $D/d.err
`;

Deno.test({
  name:
    "lab: live migration unix → tcp → local while the guest counts; a killed receiver leaves the source running",
  ignore: why !== null,
}, async (t) => {
  const counter = new TextDecoder().decode(
    (await new Deno.Command(`${root}tests/lab/guest-arg`, { args: [COUNTER] }).output()).stdout,
  ).trim();
  const res = await runScriptInLab("migration", {}, (name) => HOST(name, counter), { timeout: 500 });
  const out = res.stdout.replaceAll("\r", "");
  const all = out + "\n--- stderr ---\n" + res.stderr;
  const tail = labTail(res, out);
  await Deno.writeTextFile(`${root}build/lab-work/migration.out`, all);
  const section = (s: string) => out.split(`=== ${s}\n`)[1]?.split("\n=== ")[0] ?? "";

  for (const [hop, from, to] of [["unix", "a", "b"], ["tcp", "b", "c"], ["local", "c", "d"]]) {
    await t.step(`${hop}: both calls answer 204, the source exits 0`, () => {
      const s = section(`HOP ${hop}`);
      assert.match(s, /^CALL vm\.send-migration 204$/m, tail(6000));
      assert.match(s, /^CALL vm\.receive-migration 204$/m, tail(6000));
      assert.match(s, new RegExp(`^${from}-exit 0$`, "m"), tail(4000));
      const sent = s.match(/"total_ms":"(\d+)","downtime_ms":"(\d+)"/);
      assert.ok(sent, s);
      console.log(`  ${hop} ${from}→${to}: total ${sent[1]} ms, downtime ${sent[2]} ms`);
    });
  }
  await t.step("the ticks go on across every hop: none lost, none repeated", () => {
    const ticks = ["a", "b", "c", "d"].flatMap((x) =>
      [...section(`OUT ${x}`).matchAll(/^tick (\d+)$/gm)].map((m) => Number(m[1]))
    );
    assert.ok(ticks.length > 8, tail(4000));
    ticks.forEach((n, i) => i > 0 && assert.equal(n, ticks[i - 1] + 1, `tick ${ticks[i - 1]} then ${n}`));
  });
  await t.step("the last destination's terminal reaches the shell; its disk holds the latest count", () => {
    const d = section("OUT d");
    assert.match(d, /^serial-ok-42$/m, tail(4000));
    const now = Number(d.match(/^count-now (\d+)$/m)?.[1]);
    const disk = Number(d.match(/^disk-now disk (\d+)/m)?.[1]);
    assert.ok(disk >= now - 1 && disk <= now, `disk ${disk}, count ${now}`);
  });
  await t.step("a receiver killed mid-migration: the send fails, the source runs on", () => {
    const s = section("KILLED-RECEIVER");
    assert.match(s, /^CALL vm\.send-migration 500$/m, tail(4000));
    const m = s.match(/^D-AFTER tick (\d+) \/ tick (\d+)$/m);
    assert.ok(m && Number(m[2]) > Number(m[1]), s);
    assert.match(s, /"state":"Running"/);
    assert.match(out, /^d-exit 0$/m);
  });
});
