/**
 * virtio-net over a tap and virtio-console in the KVM lab, in one boot of the stock guest:
 *
 * - dvmm creates the tap `dvmmtap0` with 192.168.249.1/24 inside the lab VM's own network namespace
 *   (these addresses never reach a real network); the guest configures eth0 as 192.168.249.2/24 and
 *   pings the host side;
 * - the console is `--console tty` with the serial port discarded, so stdin goes to the virtio-console:
 *   the guest script writes everything to /dev/hvc0 (stdout → a file here) and reads lines from it,
 *   which the lab shell feeds through a FIFO on dvmm's stdin;
 * - while the guest waits for its second line, the lab shell asks the REST API for counters and info.
 */
import assert from "node:assert/strict";
import { labTail, labUnavailable, runScriptInLab } from "./helpers/lab.ts";

const why = labUnavailable();

const GUEST = `
exec >/dev/hvc0 2>&1
echo "hvc-out"
for d in /sys/bus/pci/devices/*; do echo "pci \${d##*/} $(cat $d/vendor) $(cat $d/device)"; done
ip addr add 192.168.249.2/24 dev eth0
ip link set eth0 up
echo "mac $(cat /sys/class/net/eth0/address)"
ping -c 3 -W 5 192.168.249.1; echo "ping-rc $?"
echo "want-input"
read -t 300 -r line </dev/hvc0; echo "got-input:$line"
echo "net-done"
read -t 300 -r line2 </dev/hvc0; echo "got-input2:$line2"
`;

const HOST = (dir: string) => `
set -u
D=/work/${dir}
mkfifo $D/in
exec 3<>$D/in
dvmm --kernel /lab/vmlinuz --initramfs /lab/initramfs.gz \\
  --cmdline "console=ttyS0 console=hvc0 panic=-1 $(guest-arg < $D/guest.sh)" \\
  --cpus boot=2 --memory size=384M --serial null --console tty \\
  --net tap=dvmmtap0,ip=192.168.249.1,mask=255.255.255.0,mac=52:54:00:12:34:56 \\
  --api-socket path=$D/api.sock <&3 >$D/out.txt 2>$D/err.txt &
pid=$!
waitfor() {
  i=0
  while ! grep -q "$1" $D/out.txt 2>/dev/null; do
    i=$((i+1))
    if [ $i -gt 900 ]; then echo "timeout waiting for $1"; return 1; fi
    if ! kill -0 $pid 2>/dev/null; then echo "dvmm exited before $1"; return 1; fi
    sleep 0.5
  done
}
if waitfor want-input; then echo hello-in >&3; fi
if waitfor net-done; then
  echo "=== COUNTERS"; dvmm remote --api-socket $D/api.sock counters; echo
  echo "=== INFO"; dvmm remote --api-socket $D/api.sock info; echo
  echo "=== TAP"; ip -s link show dvmmtap0; ip -4 addr show dvmmtap0
  echo go-on >&3
fi
wait $pid
echo "dvmm-exit $?"
echo "=== OUT"; cat $D/out.txt
echo "=== ERR"; cat $D/err.txt
`;

Deno.test({
  name: "lab: virtio-net over a tap (guest pings the host side) and virtio-console in and out",
  ignore: why !== null,
}, async (t) => {
  const res = await runScriptInLab("net", { "guest.sh": GUEST }, HOST, { timeout: 300 });
  const out = res.stdout.replaceAll("\r", "");
  const tail = labTail(res, out);
  const line = (key: string) => out.match(new RegExp(`^${key} ?(.*)$`, "m"))?.[1];
  const section = (s: string) => out.split(`=== ${s}\n`)[1]?.split("\n=== ")[0] ?? "";
  if (Deno.env.get("DVMM_LAB_VERBOSE") === "1") console.log(out);

  await t.step("the guest sees virtio-console and virtio-net on PCI", () => {
    assert.match(out, /^pci 0000:00:01\.0 0x1af4 0x1043$/m, tail(6000));
    assert.match(out, /^pci 0000:00:02\.0 0x1af4 0x1041$/m);
    assert.equal(line("mac"), "52:54:00:12:34:56");
  });
  await t.step("the guest pings the tap's host address", () => {
    assert.equal(line("ping-rc"), "0", tail(6000));
    assert.match(out, /3 packets transmitted, 3 (packets )?received/);
  });
  await t.step("console output reaches stdout; stdin reaches /dev/hvc0", () => {
    assert.match(out, /^hvc-out$/m);
    assert.equal(line("got-input:"), "hello-in");
    assert.equal(line("got-input2:"), "go-on");
    assert.equal(line("dvmm-exit"), "0");
  });
  await t.step("vm.counters shows the net counters; the device tree has the PCI devices", () => {
    const counters = JSON.parse(section("COUNTERS"));
    const net = counters._net0;
    assert.ok(net, section("COUNTERS"));
    assert.ok(net.tx_frames >= 4, `tx_frames ${net.tx_frames} (ARP + 3 echo requests)`);
    assert.ok(net.rx_frames >= 4, `rx_frames ${net.rx_frames} (ARP + 3 echo replies)`);
    assert.ok(net.tx_bytes >= 4 * 42 && net.rx_bytes >= 4 * 42);
    const info = JSON.parse(section("INFO"));
    const tree = info.device_tree;
    assert.equal(tree["_virtio-pci-_net0"].pci_bdf, "0000:00:02.0");
    assert.equal(tree["_virtio-pci-__console"].pci_bdf, "0000:00:01.0");
    assert.deepEqual(tree["_virtio-pci-_net0"].children, ["_net0"]);
    assert.match(section("TAP"), /inet 192\.168\.249\.1\/24/);
  });
});
