/**
 * vhost-user-net in the KVM lab: dvmm's own back-end (`dvmm vhost-user-net --net-backend ...`, a tap
 * `dvmmvu0` with 192.168.247.1/24 in the lab VM's own network namespace) serving the stock guest
 * booted by dvmm with `--memory shared=on --net vhost_user=on,socket=...,num_queues=4` (two pairs,
 * the control queue served by dvmm):
 *
 * - the guest configures eth0, pings the back-end's tap address, sends 8 MiB to the host with busybox
 *   nc (timed on its clock) and receives 8 MiB (timed by the lab shell);
 * - vm.info shows the device; the back-end is then killed under the running guest: dvmm logs the
 *   hang-up and keeps running (its API answers, the guest finishes and powers off, dvmm exits 0);
 * - the same guest script then runs over the in-VMM virtio-net on a tap with the same addresses, for
 *   throughput side by side (the lab is TCG-nested: the figures compare dvmm with itself).
 */
import assert from "node:assert/strict";
import { labUnavailable, runScriptInLab } from "./helpers/lab.ts";

const why = labUnavailable();
const MIB = 8;

const GUEST = `exec 2>&1
T(){ adjtimex|awk '/tv_sec/{s=$2}/tv_usec/{u=$2}END{printf "%.0f",s*1e6+u}';}
H=192.168.247.1
ip a add 192.168.247.2/24 dev eth0; ip l set eth0 up
echo "queues $(ls /sys/class/net/eth0/queues | tr '\\n' ' ')"
for f in /sys/bus/virtio/devices/*; do [ "$(cat $f/device)" = 0x0001 ] && echo "features $(cat $f/features)"; done
ping -c 3 -W 5 $H >/tmp/p 2>&1; echo "ping-rc $?"
grep transmitted /tmp/p
t=$(T); dd if=/dev/zero bs=64k count=${
  MIB * 16
} 2>/dev/null | nc $H 5010; rc=$?; echo "tx-us $(($(T) - t)) rc $rc"
mkfifo /tmp/hold; exec 7<>/tmp/hold
nc -l -p 6010 <&7 >/tmp/in & l=$!
echo "rx-ready"
wait $l; echo "rx-bytes $(wc -c </tmp/in)"
echo "mq-set-failures $(dmesg | grep -c 'Fail to set num of queue pairs')"
echo "net-done"
if grep -q vukill /proc/cmdline; then
  # the host kills the back-end, checks dvmm, then writes KILLED into the second disk
  i=0; while [ $i -lt 600 ]; do m=$(dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null|head -c6); [ "$m" = KILLED ] && break; sleep 1; i=$((i+1)); done
  ping -c 1 -W 2 $H >/dev/null 2>&1; echo "ping-after-kill-rc $?"
  echo "guest-alive-after-kill $m"
fi
exit 0
`;

const HOST = `#!/bin/bash
set -u
D=$1
NC=(busybox nc)
H=192.168.247.1 G=192.168.247.2
us() { local t=\${1/./}; echo $((10#$t)); }
waitfor() { # file pattern pid
  local i=0
  while ! grep -q "$2" "$1" 2>/dev/null; do
    i=$((i + 1))
    if [ $i -gt 900 ]; then echo "timeout waiting for $2"; kill "$3"; return 1; fi
    if ! kill -0 "$3" 2>/dev/null; then echo "dvmm exited before $2"; return 1; fi
    sleep 0.5
  done
}
cp $D/guest.sh $D/guest.img && truncate -s 64K $D/guest.img
truncate -s 64K $D/mbox.img
rm -f $D/hold && mkfifo $D/hold && exec 7<>$D/hold
run() { # name net-option extra-cmdline [backend-pid]
  local name=$1 net=$2 extra=$3 be=\${4:-}
  local out=$D/$name.out
  echo "=== RUN $name"
  "\${NC[@]}" -l -p 5010 <&7 >$D/$name.rx & local lp=$!
  dvmm --kernel /lab/vmlinuz --initramfs /lab/initramfs.gz \\
    --cmdline "console=ttyS0 panic=-1 quiet dvmm.script=/dev/vda $extra" \\
    --cpus boot=2 --memory size=512M,shared=on --serial tty --console off \\
    --disk path=$D/guest.img,readonly=on path=$D/mbox.img --net "$net" --api-socket path=$D/$name.sock \\
    </dev/null >$out 2>$D/$name.err &
  local vm=$!
  if waitfor $out rx-ready $vm; then
    local ok=0
    local t1=$EPOCHREALTIME
    for try in $(seq 20); do
      dd if=/dev/zero bs=64k count=${
  MIB * 16
} 2>/dev/null | "\${NC[@]}" $G 6010 2>/dev/null && { ok=1; break; }
      sleep 0.5
    done
    local t2=$EPOCHREALTIME
    echo "rx-us $(($(us $t2) - $(us $t1))) ok $ok"
  fi
  if waitfor $out net-done $vm; then
    echo "host-got $(stat -c %s $D/$name.rx)"
    echo "=== INFO"; dvmm remote --api-socket $D/$name.sock info; echo
    if [ -n "$be" ]; then
      kill $be; wait $be; echo "backend-killed $?"
      local i=0
      while ! grep -q "closed the connection" $D/$name.err && [ $i -lt 240 ]; do sleep 0.5; i=$((i+1)); done
      echo "=== PING-AFTER-KILL"; dvmm remote --api-socket $D/$name.sock ping; echo
      echo "alive-after-kill $(kill -0 $vm 2>/dev/null && echo yes || echo no)"
      printf KILLED | dd of=$D/mbox.img conv=notrunc 2>/dev/null
    fi
  fi
  wait $vm
  echo "dvmm-exit $?"
  kill $lp 2>/dev/null; wait $lp 2>/dev/null
  echo "=== OUT"; tr -d '\\r' <$out
  echo "=== ERR"; cat $D/$name.err
  echo "=== END $name"
}
dvmm vhost-user-net --net-backend "ip=$H,mask=255.255.255.0,socket=$D/net.sock,num_queues=4,queue_size=256,tap=dvmmvu0" \\
  >$D/be.out 2>$D/be.err &
BE=$!
i=0; while [ ! -S $D/net.sock ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done
run vu "vhost_user=on,socket=$D/net.sock,num_queues=4,mac=52:54:00:12:34:70" vukill $BE
echo "=== BACKEND"; cat $D/be.err
# the back-end's tap went with it; the in-VMM device takes the same addresses
run tap "tap=dvmmvt0,ip=$H,mask=255.255.255.0,mac=52:54:00:12:34:71" ""
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
  name:
    "lab: vhost-user-net through dvmm's own back-end (ping, nc both ways, back-end killed under the guest)",
  ignore: why !== null,
}, async (t) => {
  const res = await runScriptInLab(
    "vhost-user-net",
    { "guest.sh": GUEST, "host.sh": HOST },
    (d) => `exec bash /work/${d}/host.sh /work/${d}\n`,
    { timeout: 450 },
  );
  const out = res.stdout.replaceAll("\r", "");
  const all = out + "\n--- stderr ---\n" + res.stderr;
  if (Deno.env.get("DVMM_LAB_VERBOSE") === "1") console.log(out);
  const vu = parseRun(out, "vu");
  const tap = parseRun(out, "tap");
  const ctx = (r: Run) => (r.text || all).slice(-6000);

  await t.step("the guest pings the back-end's tap address and moves data both ways", () => {
    const g = vu.section("OUT");
    const gl = (k: string) => g.match(new RegExp(`^${k} (.*)$`, "m"))?.[1];
    assert.equal(gl("ping-rc"), "0", ctx(vu));
    assert.match(gl("tx-us") ?? "", / rc 0$/, ctx(vu));
    assert.equal(vu.line("host-got"), String(MIB << 20), ctx(vu));
    assert.equal(gl("rx-bytes"), String(MIB << 20), ctx(vu));
    assert.equal(gl("queues")?.trim(), "rx-0 rx-1 tx-0 tx-1", "two queue pairs");
    assert.equal(gl("mq-set-failures"), "0", "VQ_PAIRS_SET on dvmm's control queue succeeded");
    const f = gl("features");
    assert.ok(bit(f, 17) && bit(f, 22) && bit(f, 5), `CTRL_VQ, MQ and MAC negotiated: ${f}`);
  });
  await t.step("vm.info shows the vhost-user-net device", () => {
    const info = JSON.parse(vu.section("INFO").split("\n")[0]);
    const net = info.config.net[0];
    assert.equal(net.vhost_user, true, vu.section("INFO"));
    assert.match(net.vhost_socket, /net\.sock$/);
    assert.equal(net.mac, "52:54:00:12:34:70");
    assert.equal(net.num_queues, 4);
    assert.match(net.id, /^_net\d+$/);
    assert.deepEqual(
      info.device_tree[`_virtio-pci-${net.id}`]?.children,
      [net.id],
      JSON.stringify(info.device_tree),
    );
  });
  await t.step("the back-end killed under the running guest: dvmm logs it and goes on", () => {
    assert.match(
      vu.section("ERR"),
      /vhost-user back-end .*net\.sock: the back-end closed the connection/,
      ctx(vu),
    );
    assert.equal(vu.line("alive-after-kill"), "yes", ctx(vu));
    assert.match(vu.section("OUT"), /^guest-alive-after-kill KILLED$/m, ctx(vu));
    assert.match(vu.section("OUT"), /^ping-after-kill-rc [1-9]/m, "no network without the back-end");
    assert.equal(vu.line("dvmm-exit"), "0", ctx(vu));
  });
  await t.step("throughput beside the in-VMM virtio-net", () => {
    const rate = (r: Run, key: string) => {
      const g = r.section("OUT");
      const m = (key === "tx-us" ? g : r.text).match(new RegExp(`^${key} (\\d+)`, "m"));
      return m ? `${(MIB / (Number(m[1]) / 1e6)).toFixed(1)} MiB/s` : "n/a";
    };
    console.log(
      `guest→host: vhost-user-net ${rate(vu, "tx-us")}, virtio-net ${rate(tap, "tx-us")}; ` +
        `host→guest: vhost-user-net ${rate(vu, "rx-us")}, virtio-net ${rate(tap, "rx-us")}`,
    );
    assert.equal(tap.line("host-got"), String(MIB << 20), ctx(tap));
  });
});
