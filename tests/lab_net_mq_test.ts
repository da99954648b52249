/**
 * Multi-queue virtio-net, MTU and mergeable RX buffers in the KVM lab: the stock guest with 4 vCPUs,
 * booted three times, each time over a tap dvmm creates (`dvmmq0`, 192.168.249.1/24 in the lab VM's own
 * network namespace), in two lab sessions (the single-queue runs, then `mq` and `fds`):
 *
 * - `sq-nomrg`: num_queues=2 without mergeable RX buffers (DVMM_NET_MRG_RXBUF=off): the single-queue
 *   device;
 * - `sq-mrg`: num_queues=2, MRG_RXBUF offered (the default, as QEMU);
 * - `mq`: num_queues=8,mtu=9000 (and MRG_RXBUF on): 4 queue pairs, a multi-queue tap with one queue
 *   per pair;
 * - `fds`: a client opens a 2-queue tap and sends both fds with vm.add-net (num_queues=4, mtu=4000),
 *   as an orchestrator hands taps over.
 *
 * In each run the guest pings with the largest packet its MTU allows, moves data both ways in 4
 * parallel TCP flows (busybox nc, each end pinned to its own vCPU with taskset) and in one large
 * transfer timed on the guest's clock (guest → host) and on the lab shell's (host → guest), then
 * lists its per-queue virtio interrupts. The mq run must show 4 RX and 4 TX queues in sysfs (the
 * Linux driver enables every pair at probe with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET), MTU 9000, the
 * negotiated MQ / CTRL_VQ / MTU / MRG_RXBUF features, and interrupts on more than one RX queue.
 * Throughput of the three runs is printed side by side (the lab guest is TCG-nested and slow: the
 * figures compare dvmm with itself, nothing more).
 */
import assert from "node:assert/strict";
import { labTail, labUnavailable, runScriptInLab } from "./helpers/lab.ts";

const why = labUnavailable();
const root = new URL("../", import.meta.url).pathname;

/** MiB per parallel flow, and for the large transfer. */
const PAR_MIB = 1;
const BIG_MIB = 16;

const GUEST = `exec 2>&1
T(){ adjtimex|awk '/tv_sec/{s=$2}/tv_usec/{u=$2}END{printf "%.0f",s*1e6+u}';}
H=192.168.249.1
ip a add 192.168.249.2/24 dev eth0; ip l set eth0 up
echo "queues $(ls /sys/class/net/eth0/queues | tr '\\n' ' ')"
echo "mtu $(cat /sys/class/net/eth0/mtu)"
for f in /sys/bus/virtio/devices/*; do [ "$(cat $f/device)" = 0x0001 ] && echo "features $(cat $f/features)"; done
ping -c 3 -W 5 -s $(($(cat /sys/class/net/eth0/mtu) - 28)) $H >/tmp/p 2>&1; echo "ping-rc $?"
grep transmitted /tmp/p
n=$(nproc)
# a listener's stdin must never end: at EOF busybox nc half-closes, and the sender stops early
mkfifo /tmp/hold; exec 7<>/tmp/hold
for i in 1 2 3 4; do taskset -c $(((i - 1) % n)) nc -l -p 600$i <&7 >/dev/null & eval "l$i=\\$!"; done
nc -l -p 6010 <&7 >/dev/null & lb=$!
sleep 1
for i in 1 2 3 4; do
  taskset -c $(((i - 1) % n)) sh -c "dd if=/dev/zero bs=64k count=${PAR_MIB * 16} 2>/dev/null | nc $H 500$i" &
  eval "s$i=\\$!"
done
wait $s1 $s2 $s3 $s4; echo "tx-par-done"
t=$(T); dd if=/dev/zero bs=64k count=${
  BIG_MIB * 16
} 2>/dev/null | nc $H 5010; rc=$?; echo "tx-us $(($(T) - t)) rc $rc"
echo "rx-ready"
wait $l1 $l2 $l3 $l4 $lb; echo "rx-done"
grep -E 'virtio[0-9]+-(input|output)\\.' /proc/interrupts |
  awk '{s=0; for(i=2;i<=NF&&$i~/^[0-9]+$/;i++) s+=$i; n=$NF; sub(/^virtio[0-9]+-/,"",n); print "irq", n, s}'
echo "counters-now"
timeout 300 nc -l -p 6099 <&7 >/dev/null
exit 0
`;

/** The guest of the `fds` run: 2 vCPUs, a device whose 2 queue pairs are taps the client opened. */
const GUEST_FDS = `exec 2>&1
ip a add 192.168.248.2/24 dev eth0; ip l set eth0 up
echo "queues $(ls /sys/class/net/eth0/queues | tr '\\n' ' ')"
echo "mtu $(cat /sys/class/net/eth0/mtu)"
for c in 0 1; do taskset -c $c ping -c 3 -W 5 -s 3972 192.168.248.1 >/tmp/p 2>&1; echo "ping$c-rc $?"; done
grep -E 'virtio[0-9]+-(input|output)\\.' /proc/interrupts |
  awk '{s=0; for(i=2;i<=NF&&$i~/^[0-9]+$/;i++) s+=$i; n=$NF; sub(/^virtio[0-9]+-/,"",n); print "irq", n, s}'
echo "fds-done"
sleep 600
`;

const HOST = `#!/bin/bash
set -u
D=$1
NC=(busybox nc)
H=192.168.249.1 G=192.168.249.2 TAP=dvmmq0
us() { local t=\${1/./}; echo $((10#$t)); }
waitfor() { # file pattern pid
  local i=0
  while ! grep -q "$2" "$1" 2>/dev/null; do
    i=$((i + 1))
    if [ $i -gt 600 ]; then
      echo "timeout waiting for $2"
      # where the data stopped: dvmm's queue counters and each parallel flow's bytes so far
      [ -n "\${SOCK:-}" ] && dvmm remote --api-socket "$SOCK" counters
      ls -l $D/*.par* 2>/dev/null
      kill "$3"; return 1
    fi
    if ! kill -0 "$3" 2>/dev/null; then echo "dvmm exited before $2"; return 1; fi
    sleep 0.5
  done
}
cp $D/guest.sh $D/guest.img && truncate -s 64K $D/guest.img
# a listener's stdin must never end: at EOF busybox nc half-closes, and the sender stops early
rm -f $D/hold && mkfifo $D/hold && exec 7<>$D/hold
run() { # name MRG_RXBUF(on|off) extra-net-options
  local name=$1 mrg=$2 net="tap=$TAP,ip=$H,mask=255.255.255.0,mac=52:54:00:12:34:60$3"
  local out=$D/$name.out lp=() sp=()
  SOCK=$D/$name.sock
  echo "=== RUN $name"
  echo "net $net mrg_rxbuf=$mrg"
  for i in 1 2 3 4; do "\${NC[@]}" -l -p 500$i <&7 >$D/$name.par$i & lp+=($!); done
  "\${NC[@]}" -l -p 5010 <&7 >/dev/null & lp+=($!)
  # The guest's console and dvmm's log (-v: a guest reset names its source) also go to the lab's console, so
  # that a run the lab VM does not survive still shows them in the lab fault's console tail.
  DVMM_NET_MRG_RXBUF=$mrg dvmm -v --kernel /lab/vmlinuz --initramfs /lab/initramfs.gz \\
    --cmdline "console=ttyS0 panic=-1 quiet dvmm.script=/dev/vda" \\
    --cpus boot=4 --memory size=512M --serial tty --console off \\
    --disk path=$D/guest.img,readonly=on --net "$net" --api-socket path=$D/$name.sock \\
    </dev/null > >(tee $out >/dev/console) 2> >(tee $D/$name.err >/dev/console) &
  local vm=$!
  if waitfor $out rx-ready $vm; then
    echo "tap-flags $(cat /sys/class/net/$TAP/tun_flags) mtu $(cat /sys/class/net/$TAP/mtu)"
    local tx0=$(cat /sys/class/net/$TAP/statistics/tx_bytes)
    send() { # port MiB: retried until the guest's listener takes the connection
      for try in $(seq 20); do
        dd if=/dev/zero bs=64k count=$(($2 * 16)) 2>/dev/null | "\${NC[@]}" $G $1 2>/dev/null && return 0
        sleep 0.5
      done
      return 1
    }
    for i in 1 2 3 4; do send 600$i ${PAR_MIB} & sp+=($!); done
    wait "\${sp[@]}"
    local t1=$EPOCHREALTIME
    send 6010 ${BIG_MIB}
    local t2=$EPOCHREALTIME
    echo "rx-us $(($(us $t2) - $(us $t1)))"
    echo "tap-tx-bytes $(($(cat /sys/class/net/$TAP/statistics/tx_bytes) - tx0))"
  fi
  if waitfor $out counters-now $vm; then
    echo "=== COUNTERS"; dvmm remote --api-socket $D/$name.sock counters; echo
    echo "=== INFO"; dvmm remote --api-socket $D/$name.sock info; echo
    echo "=== THREADS"; for t in /proc/$vm/task/*; do cat $t/comm; done | sort | uniq -c | tr '\\n' ';'; echo
    for i in 1 2 3 4 5 6 7 8 9 10; do echo | "\${NC[@]}" $G 6099 >/dev/null 2>&1 && break; sleep 0.5; done
  fi
  wait $vm
  echo "dvmm-exit $?"
  sleep 0.5 # the tee processes write the last of the output
  for p in "\${lp[@]}"; do kill $p 2>/dev/null; wait $p 2>/dev/null; done
  for i in 1 2 3 4; do echo "par$i-bytes $(stat -c %s $D/$name.par$i)"; done
  echo "=== OUT"; tr -d '\\r' <$out
  echo "=== ERR"; cat $D/$name.err
  echo "=== END $name"
}
# fd=[...]: the client's multi-queue tap, one fd per pair, sent with vm.add-net
fds() {
  echo "=== RUN fds"
  cp $D/guest-fds.sh $D/guest-fds.img && truncate -s 64K $D/guest-fds.img
  dvmm --api-socket path=$D/fds.sock >$D/fds.out 2>$D/fds.err &
  local vm=$!
  deno run -A --no-prompt ${root}tests/lab/net_fds_flow.ts $D/fds.sock \\
    "console=ttyS0 panic=-1 quiet dvmm.script=/dev/vda" $D/fds.out $D/guest-fds.img
  wait $vm
  echo "dvmm-exit $?"
  echo "=== OUT"; tr -d '\\r' <$D/fds.out
  echo "=== ERR"; cat $D/fds.err
  echo "=== END fds"
}

shift
for c in "$@"; do
  case $c in
  sq-nomrg) run sq-nomrg off "" ;;
  sq-mrg) run sq-mrg on "" ;;
  mq) run mq on ",num_queues=8,mtu=9000" ;;
  fds) fds ;;
  esac
done
`;

interface Run {
  text: string;
  line(key: string): string | undefined;
  section(name: string): string;
}

function parseRun(all: string, name: string): Run {
  const text = all.split(`=== RUN ${name}\n`)[1]?.split(`=== END ${name}`)[0] ?? "";
  return {
    text,
    line: (key) => text.match(new RegExp(`^${key} (.*)$`, "m"))?.[1],
    section: (s) => text.split(`=== ${s}\n`)[1]?.split("\n=== ")[0] ?? "",
  };
}

/** Bit `b` of a sysfs virtio features string (one '0'/'1' per bit, bit 0 first). */
const bit = (features: string | undefined, b: number) => features?.[b] === "1";

Deno.test({
  name: "lab: multi-queue virtio-net (4 pairs, MTU 9000) carries traffic on several queues; MRG_RXBUF",
  ignore: why !== null,
}, async (t) => {
  // The lab carries the module cache: compile the client here, where it is fast.
  const cache = await new Deno.Command(Deno.execPath(), {
    args: ["cache", `${root}tests/lab/net_fds_flow.ts`],
  })
    .output();
  assert.equal(cache.code, 0, new TextDecoder().decode(cache.stderr));
  // Two lab sessions, so that a lab fault (the nested lab now and then resets under this much traffic) costs
  // a rerun of half the cases, not of all four.
  const runHalf = (cases: string[]) =>
    runScriptInLab(
      "netmq",
      { "guest.sh": GUEST, "guest-fds.sh": GUEST_FDS, "host.sh": HOST },
      (d) => `exec bash /work/${d}/host.sh /work/${d} ${cases.join(" ")}\n`,
      { timeout: 500 },
    );
  const first = await runHalf(["sq-nomrg", "sq-mrg"]);
  const second = await runHalf(["mq", "fds"]);
  const res = {
    code: first.code || second.code,
    stdout: first.stdout + second.stdout,
    stderr: first.stderr + second.stderr,
  };
  const out = res.stdout.replaceAll("\r", "");
  const all = out + "\n--- stderr ---\n" + res.stderr;
  const tail = labTail(res, out);
  if (Deno.env.get("DVMM_LAB_VERBOSE") === "1") console.log(out);
  const runs = Object.fromEntries(["sq-nomrg", "sq-mrg", "mq"].map((n) => [n, parseRun(out, n)]));
  const mq = runs.mq;

  await t.step("every run boots, pings with its MTU's largest packet and moves all the data", () => {
    for (const [name, r] of Object.entries(runs)) {
      const ctx = `${name}:\n${(r.text || all).slice(-5000)}`;
      assert.equal(r.line("ping-rc"), "0", ctx);
      assert.match(r.text, /3 packets transmitted, 3 (packets )?received/, ctx);
      assert.match(r.line("tx-us") ?? "", /^\d+ rc 0$/, ctx);
      assert.ok(Number(r.line("rx-us")) > 0, ctx);
      assert.match(r.text, /^rx-done$/m, ctx);
      for (let i = 1; i <= 4; i++) assert.equal(Number(r.line(`par${i}-bytes`)), PAR_MIB << 20, ctx);
      assert.ok(Number(r.line("tap-tx-bytes")) >= (4 * PAR_MIB + BIG_MIB) << 20, ctx);
      assert.equal(r.line("dvmm-exit"), "0", ctx);
    }
  });

  await t.step("mq: 4 RX and 4 TX queues enabled by the guest, MTU 9000, MQ features negotiated", () => {
    const ctx = mq.text.slice(-6000) || tail(6000);
    assert.deepEqual(mq.line("queues")?.trim().split(" ").sort(), [
      "rx-0",
      "rx-1",
      "rx-2",
      "rx-3",
      "tx-0",
      "tx-1",
      "tx-2",
      "tx-3",
    ], ctx);
    assert.equal(mq.line("mtu"), "9000", ctx);
    assert.match(mq.line("tap-flags") ?? "", /^0x5102 mtu 9000$/, "tap: TAP|NO_PI|VNET_HDR|MULTI_QUEUE");
    const f = mq.line("features");
    for (
      const [b, what] of [[17, "CTRL_VQ"], [22, "MQ"], [3, "MTU"], [15, "MRG_RXBUF"], [0, "CSUM"], [
        11,
        "HOST_TSO4",
      ]] as const
    ) {
      assert.ok(bit(f, b), `${what} (bit ${b}) negotiated: ${f}`);
    }
    assert.equal(runs["sq-mrg"].line("queues")?.trim(), "rx-0 tx-0");
    assert.ok(bit(runs["sq-mrg"].line("features"), 15), "MRG_RXBUF in the single-queue run");
    assert.ok(!bit(runs["sq-nomrg"].line("features"), 15), "no MRG_RXBUF with DVMM_NET_MRG_RXBUF=off");
    assert.equal(runs["sq-mrg"].line("mtu"), "1500", "the tap's MTU, advertised with VIRTIO_NET_F_MTU");
  });

  await t.step("mq: traffic on more than one queue pair; counters are sums over the queues", () => {
    const irqs = [...mq.text.matchAll(/^irq (input|output)\.(\d+) (\d+)$/gm)].map((m) => ({
      dir: m[1],
      q: Number(m[2]),
      n: Number(m[3]),
    }));
    const busyRx = irqs.filter((x) => x.dir === "input" && x.n > 0).map((x) => x.q);
    const busyTx = irqs.filter((x) => x.dir === "output" && x.n > 0).map((x) => x.q);
    console.log(`mq: per-queue guest interrupts: ${irqs.map((x) => `${x.dir}.${x.q}=${x.n}`).join(" ")}`);
    assert.equal(irqs.filter((x) => x.dir === "input").length, 4, mq.text.slice(-4000));
    assert.ok(busyRx.length >= 2, `RX interrupts on queues ${busyRx} only`);
    console.log(`mq: RX queues with traffic ${busyRx}, TX queues with completions ${busyTx}`);
    const counters = JSON.parse(mq.section("COUNTERS"));
    const net = counters._net1 ??
      Object.values(counters).find((c) => (c as object) && "rx_frames" in (c as object));
    assert.ok(net, mq.section("COUNTERS"));
    assert.deepEqual(Object.keys(net).sort(), ["rx_bytes", "rx_frames", "tx_bytes", "tx_frames"]);
    assert.ok(net.rx_bytes >= (4 * PAR_MIB + BIG_MIB) << 20, `rx_bytes ${net.rx_bytes}`);
    assert.ok(net.tx_bytes >= (4 * PAR_MIB + BIG_MIB) << 20, `tx_bytes ${net.tx_bytes}`);
    const info = JSON.parse(mq.section("INFO"));
    const cfg = info.config.net[0];
    assert.deepEqual([cfg.num_queues, cfg.mtu], [8, 9000]);
  });

  await t.step(
    "fd=[...]: a client's 2-queue tap sent with vm.add-net (num_queues=4) carries the guest's pings",
    () => {
      const r = parseRun(out, "fds");
      const ctx = r.text.slice(-6000) || tail(6000);
      const status = (endpoint: string) => r.text.match(new RegExp(`^CALL ${endpoint} (\\d+)`, "m"))?.[1];
      for (const e of ["vm.create", "vm.add-net", "vm.boot", "vmm.shutdown"]) {
        assert.equal(status(e), "204", ctx);
      }
      assert.match(r.line("TAP-FLAGS") ?? "", /^0x5102$/, ctx);
      assert.equal(r.line("TAP-MTU"), "4000", "the MTU given with add-net is set on the client's tap");
      assert.deepEqual(r.line("queues")?.trim().split(" ").sort(), ["rx-0", "rx-1", "tx-0", "tx-1"], ctx);
      assert.equal(r.line("mtu"), "4000", ctx);
      assert.equal(r.line("ping0-rc"), "0", ctx);
      assert.equal(r.line("ping1-rc"), "0", ctx);
      const counters = JSON.parse(r.text.match(/^CALL vm\.counters 200 (.*)$/m)?.[1] ?? "{}");
      assert.ok(counters._net1?.tx_frames >= 6 && counters._net1?.rx_frames >= 6, JSON.stringify(counters));
      const info = JSON.parse(r.text.match(/^CALL vm\.info 200 (.*)$/m)?.[1] ?? "{}");
      assert.deepEqual([info.config?.net?.[0]?.num_queues, info.config?.net?.[0]?.mtu], [4, 4000], ctx);
      assert.equal(r.line("dvmm-exit"), "0", ctx);
      console.log(
        `fds: per-queue guest interrupts: ${
          [...r.text.matchAll(/^irq (\S+) (\d+)$/gm)].map((m) => `${m[1]}=${m[2]}`).join(" ")
        }`,
      );
    },
  );

  await t.step("throughput, MiB/s (TCG-nested guest, busybox nc; the sq runs share a lab session)", () => {
    const rows: string[] = [];
    for (const [name, r] of Object.entries(runs)) {
      const txUs = Number(r.line("tx-us")?.split(" ")[0]);
      const rxUs = Number(r.line("rx-us"));
      const mibs = (us: number) => us > 0 ? (BIG_MIB / (us / 1e6)).toFixed(2) : "-";
      rows.push(
        `${name.padEnd(9)} guest->host ${mibs(txUs).padStart(6)}   host->guest ${mibs(rxUs).padStart(6)}`,
      );
    }
    console.log(`net throughput, ${BIG_MIB} MiB one TCP flow each way:\n  ${rows.join("\n  ")}`);
  });
});
