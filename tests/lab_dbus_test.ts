/**
 * The D-Bus API driving a real guest in the KVM lab, as a user would: a private dbus-daemon, dvmm with
 * `--dbus-service-name/--dbus-object-path` (no REST socket), and `dbus-send` calls on
 * org.cloudhypervisor.DBusApi1: VmmPing, VmCreate, VmBoot, VmInfo, VmShutdown, VmmShutdown, with
 * `dbus-monitor` watching the `Event` signal.
 */
import assert from "node:assert/strict";
import { labTail, labUnavailable, runScriptInLab } from "./helpers/lab.ts";

const why = labUnavailable();
const root = new URL("../", import.meta.url).pathname;

const BUS_CONF = `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=/tmp/dvmm-lab-bus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
`;

const HOST = (dir: string) => `
set -u
D=/work/${dir}
dbus-daemon --config-file=$D/bus.conf --nofork --print-address >$D/bus.addr 2>$D/bus.err &
bus=$!
i=0; while [ ! -s $D/bus.addr ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
export DBUS_SESSION_BUS_ADDRESS=$(head -n1 $D/bus.addr)
dbus-monitor "type='signal',interface='org.cloudhypervisor.DBusApi1',member='Event'" >$D/events.txt 2>&1 &
mon=$!
dvmm --dbus-service-name org.cloudhypervisor.DBusApi --dbus-object-path /org/cloudhypervisor/DBusApi \\
  >$D/out.txt 2>$D/err.txt &
pid=$!
call() { # member [json]
  m=$1; shift
  if [ $# -gt 0 ]; then set -- "string:$1"; fi
  r=$(dbus-send --print-reply --reply-timeout=600000 --dest=org.cloudhypervisor.DBusApi \\
      /org/cloudhypervisor/DBusApi org.cloudhypervisor.DBusApi1.$m "$@" 2>&1)
  echo "CALL $m rc=$? $(echo "$r" | tr '\\n' ' ')"
}
i=0
until dbus-send --print-reply --dest=org.cloudhypervisor.DBusApi /org/cloudhypervisor/DBusApi \\
    org.cloudhypervisor.DBusApi1.VmmPing >/dev/null 2>&1; do
  i=$((i+1)); [ $i -gt 600 ] && { echo "service never came up"; break; }; sleep 0.2
done
call VmmPing
call VmCreate "$(cat $D/vm.json)"
call VmBoot
call VmInfo
i=0; while ! grep -q "dbus-guest-ok" $D/out.txt && [ $i -lt 900 ]; do sleep 0.5; i=$((i+1)); done
call VmBoot
call VmShutdown
call VmInfo
call VmmShutdown
wait $pid
echo "dvmm-exit $?"
sleep 1; kill $mon $bus 2>/dev/null
echo "=== EVENTS"; cat $D/events.txt
echo "=== OUT"; cat $D/out.txt
echo "=== ERR"; cat $D/err.txt
`;

Deno.test({
  name: "lab: the D-Bus API creates, boots, inspects and shuts down a real guest",
  ignore: why !== null,
}, async (t) => {
  const guestArg = new TextDecoder().decode(
    (await new Deno.Command(`${root}tests/lab/guest-arg`, { args: ["echo dbus-guest-ok; sleep 600"] })
      .output())
      .stdout,
  ).trim();
  const vm = JSON.stringify({
    cpus: { boot_vcpus: 2, max_vcpus: 2 },
    memory: { size: 384 << 20 },
    payload: {
      kernel: "/lab/vmlinuz",
      initramfs: "/lab/initramfs.gz",
      cmdline: `console=ttyS0 panic=-1 ${guestArg}`,
    },
    serial: { mode: "Tty" },
    console: { mode: "Off" },
  });
  const res = await runScriptInLab("dbus", { "vm.json": vm, "bus.conf": BUS_CONF }, HOST, { timeout: 300 });
  const out = res.stdout.replaceAll("\r", "");
  const tail = labTail(res, out);
  const calls = [...out.matchAll(/^CALL (\w+) rc=(\d+) (.*)$/gm)].map((m) => ({
    m: m[1],
    rc: m[2],
    r: m[3],
  }));
  const section = (s: string) => out.split(`=== ${s}\n`)[1]?.split("\n=== ")[0] ?? "";

  await t.step("ping, create and boot answer over the bus", () => {
    assert.equal(calls[0]?.m, "VmmPing", tail(6000));
    assert.equal(calls[0].rc, "0", calls[0].r);
    assert.match(calls[0].r, /"version"/);
    assert.deepEqual(
      calls.slice(1, 3).map((c) => [c.m, c.rc]),
      [["VmCreate", "0"], ["VmBoot", "0"]],
      tail(6000),
    );
  });
  await t.step("VmInfo shows the running VM; the guest ran", () => {
    assert.equal(calls[3].m, "VmInfo");
    assert.match(calls[3].r, /"state":"Running"/, calls[3].r);
    assert.match(section("OUT"), /dbus-guest-ok/, tail(6000));
  });
  await t.step("a second VmBoot is a D-Bus error carrying the API's message", () => {
    assert.equal(calls[4].m, "VmBoot");
    assert.notEqual(calls[4].rc, "0");
    assert.match(calls[4].r, /org\.freedesktop\.DBus\.Error\.Failed/);
    assert.match(calls[4].r, /already booted/);
  });
  await t.step("shutdown, info Shutdown, VMM shutdown; the process exits 0", () => {
    assert.deepEqual(calls.slice(5).map((c) => [c.m, c.rc]), [["VmShutdown", "0"], ["VmInfo", "0"], [
      "VmmShutdown",
      "0",
    ]]);
    assert.match(calls[6].r, /Shutdown/);
    assert.match(out, /^dvmm-exit 0$/m, tail(3000));
  });
  await t.step("the Event signal carried the life-cycle events", () => {
    const ev = section("EVENTS");
    for (const e of ["booting", "booted", "shutdown"]) {
      assert.match(ev, new RegExp(`"event":"${e}"`), ev.slice(-3000));
    }
  });
});
