/**
 * Kata Containers' way of driving the VMM, against a real guest in the KVM lab: vm.create, then
 * vm.add-net with a tap the client opened and sends as SCM_RIGHTS (tests/lab/kata_flow.ts), then
 * vm.boot. The guest's traffic must reach *that* tap (no tap of dvmm's own), and the VMM's vCPU threads
 * carry the names Kata looks for (`vcpu0`, `vcpu1`).
 */
import assert from "node:assert/strict";
import { labTail, labUnavailable, runScriptInLab } from "./helpers/lab.ts";

const why = labUnavailable();
const root = new URL("../", import.meta.url).pathname;

const GUEST = `
ip addr add 192.168.250.2/24 dev eth0
ip link set eth0 up
ping -c 3 -W 5 192.168.250.1; echo "ping-rc $?"
sleep 600
`;

const HOST = (dir: string) => `
set -u
D=/work/${dir}
dvmm --api-socket path=$D/api.sock >$D/out.txt 2>$D/err.txt &
pid=$!
deno run -A --no-prompt ${root}tests/lab/kata_flow.ts $D/api.sock \\
  "console=ttyS0 panic=-1 $(guest-arg < $D/guest.sh)" $D/out.txt
wait $pid
echo "dvmm-exit $?"
echo "=== OUT"; cat $D/out.txt
echo "=== ERR"; cat $D/err.txt
`;

Deno.test({
  name:
    "lab: Kata's flow: create, add-net with a tap sent as SCM_RIGHTS, boot; the guest pings through that tap",
  ignore: why !== null,
}, async (t) => {
  // The lab carries the module cache: compile the client here, where it is fast.
  const cache = await new Deno.Command(Deno.execPath(), { args: ["cache", `${root}tests/lab/kata_flow.ts`] })
    .output();
  assert.equal(cache.code, 0, new TextDecoder().decode(cache.stderr));
  const res = await runScriptInLab("clients", { "guest.sh": GUEST }, HOST, { timeout: 300 });
  const out = res.stdout.replaceAll("\r", "");
  const tail = labTail(res, out);
  const status = (endpoint: string) => out.match(new RegExp(`^CALL ${endpoint} (\\d+)`, "m"))?.[1];
  const line = (key: string) => out.match(new RegExp(`^${key} (.*)$`, "m"))?.[1];

  await t.step("create, add-net (with the tap fd), boot answer 204", () => {
    assert.equal(status("vm.create"), "204", tail(6000));
    assert.equal(status("vm.add-net"), "204", tail(6000));
    assert.equal(status("vm.boot"), "204", tail(6000));
  });
  await t.step("vCPU threads are named vcpu0 and vcpu1", () => {
    const names = (line("THREADS") ?? "").split(" ");
    assert.deepEqual(names.filter((n) => /^vcpu\d+$/.test(n)).sort(), ["vcpu0", "vcpu1"], line("THREADS"));
  });
  await t.step("the guest pings the host side of the client's tap, and only that tap carries it", () => {
    assert.equal(line("ping-rc"), "0", tail(6000));
    const m = line("TAP")?.match(/rx_packets (\d+) tx_packets (\d+)/);
    assert.ok(m, tail(4000));
    assert.ok(Number(m[1]) >= 4 && Number(m[2]) >= 4, `katatap0 carried the pings: ${line("TAP")}`);
    assert.doesNotMatch(line("OTHER-TAPS") ?? "", /vmtap/, "dvmm made no tap of its own");
    const counters = JSON.parse(out.match(/^CALL vm\.counters 200 (.*)$/m)?.[1] ?? "{}");
    assert.ok(counters._net0?.tx_frames >= 4, JSON.stringify(counters));
    assert.equal(status("vmm.shutdown"), "204");
    assert.equal(line("dvmm-exit"), "0", tail(3000));
  });
});
