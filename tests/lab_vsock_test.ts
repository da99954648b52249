/**
 * virtio-vsock with Cloud Hypervisor's hybrid (UNIX socket) host side, in the KVM lab, one boot of the
 * default guest with `--vsock cid=3,socket=$D/v.sock`:
 *
 * - the guest runs `vsock listen 1024` (tests/lab/guest-tools/vsock.c, an echo server) and connects to
 *   host port 1025, which reaches the UNIX listener at `$D/v.sock_1025` of the host program;
 * - the host program (tests/lab/vsock_host.ts, Deno) connects with `CONNECT 1024`, gets `OK <port>`,
 *   echoes 64 MiB byte-exact (printing MiB/s), opens 32 connections at once, and sees `CONNECT 4444`
 *   (no listener) closed by the guest's RST;
 * - the same 64 MiB echo with the C tool as the host client, then the same C tool against QEMU's
 *   vhost-vsock (`-device vhost-vsock-pci,guest-cid=4`, AF_VSOCK from the lab) when the lab kernel has
 *   vhost_vsock: throughput side by side.
 */
import assert from "node:assert/strict";
import { labTail, labUnavailable, runScriptInLab } from "./helpers/lab.ts";

const why = labUnavailable();
const root = new URL("../", import.meta.url).pathname;

const GUEST = `
for d in /sys/bus/pci/devices/*; do echo "pci \${d##*/} $(cat $d/vendor) $(cat $d/device)"; done
vsock listen 1024 >/tmp/listen.log 2>&1 &
for i in $(seq 60); do
  reply=$(echo "hello from the guest" | vsock connect 2 1025 2>/tmp/g2h.err) && break
  sleep 1
done
echo "g2h-reply $reply"
echo "vsock-guest-ready"
vsock wait 1999
echo "guest-done $?"
`;

const QEMU_GUEST = `
vsock listen 1024 >/tmp/listen.log 2>&1 &
echo "vsock-guest-ready"
vsock wait 1999
`;

const HOST = (dir: string) => `
set -u
D=/work/${dir}
cp $D/vsock-tool /tmp/vsock && chmod +x /tmp/vsock
timeout 400 deno run -A --no-prompt ${root}tests/lab/vsock_host.ts $D/v.sock 64 32 256 >$D/host.txt 2>&1 &
hpid=$!
dvmm --kernel /lab/vmlinuz --initramfs /lab/initramfs.gz \\
  --cmdline "console=ttyS0 panic=-1 quiet $(guest-arg < $D/guest.sh)" \\
  --cpus boot=2 --memory size=512M --serial file=$D/out.txt --console off \\
  --vsock cid=3,socket=$D/v.sock --api-socket path=$D/api.sock 2>$D/err.txt &
pid=$!
wait $hpid; echo "host-exit $?"
timeout 300 /tmp/vsock unix-echo-test $D/v.sock 1024 64 >$D/c.txt 2>&1; echo "c-echo-exit $?"
echo "C-ECHO $(cat $D/c.txt)"
echo "=== COUNTERS"; dvmm remote --api-socket $D/api.sock counters; echo
echo "=== INFO"; dvmm remote --api-socket $D/api.sock info; echo
echo "=== END"
echo bye | timeout 60 /tmp/vsock unix-connect $D/v.sock 1999; echo "bye-exit $?"
( sleep 120; kill $pid 2>/dev/null ) & wd=$!
wait $pid; echo "dvmm-exit $?"
kill $wd 2>/dev/null
[ -e $D/v.sock ] && echo "socket-left yes" || echo "socket-left no"

if modprobe vhost_vsock 2>$D/modprobe.txt; then
  qemu-system-x86_64 -accel kvm -M microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on,pcie=on \\
    -cpu host -smp 2 -m 512M -nodefaults -no-user-config -display none -no-reboot \\
    -serial file:$D/qout.txt -device vhost-vsock-pci,guest-cid=4 \\
    -kernel /lab/vmlinuz -initrd /lab/initramfs.gz \\
    -append "console=ttyS0 panic=-1 quiet $(guest-arg < $D/qguest.sh)" 2>$D/qerr.txt &
  qpid=$!
  for i in $(seq 120); do
    grep -q vsock-guest-ready $D/qout.txt 2>/dev/null && break
    kill -0 $qpid 2>/dev/null || break
    sleep 1
  done
  sleep 1
  timeout 300 /tmp/vsock echo-test 4 1024 64 >$D/q.txt 2>&1; echo "qemu-echo-exit $?"
  echo "QEMU-ECHO $(cat $D/q.txt)"
  echo bye | timeout 60 /tmp/vsock connect 4 1999 >/dev/null
  ( sleep 60; kill $qpid 2>/dev/null ) & wd=$!
  wait $qpid; kill $wd 2>/dev/null
  echo "=== QEMU-ERR"; cat $D/qerr.txt
else
  echo "QEMU-ECHO unavailable: modprobe vhost_vsock: $(cat $D/modprobe.txt)"
fi
echo "=== HOST"; cat $D/host.txt
echo "=== OUT"; cat $D/out.txt
echo "=== ERR"; cat $D/err.txt
`;

Deno.test({
  name: "lab: virtio-vsock: CONNECT/OK through the UNIX socket, 64 MiB echo, 32 connections, PATH_1025, RST",
  ignore: why !== null,
}, async (t) => {
  // The lab carries the module cache and the checkout: compile the host program and the C tool here.
  const cache = await new Deno.Command(Deno.execPath(), { args: ["cache", `${root}tests/lab/vsock_host.ts`] })
    .output();
  assert.equal(cache.code, 0, new TextDecoder().decode(cache.stderr));
  const tool = await Deno.makeTempFile({ prefix: "dvmm-vsock-tool-" });
  try {
    const cc = await new Deno.Command("gcc", {
      args: ["-static", "-O2", "-o", tool, `${root}tests/lab/guest-tools/vsock.c`],
    }).output();
    assert.equal(cc.code, 0, new TextDecoder().decode(cc.stderr));
    const res = await runScriptInLab(
      "vsock",
      { "guest.sh": GUEST, "qguest.sh": QEMU_GUEST, "vsock-tool": await Deno.readFile(tool) },
      HOST,
      { timeout: 400 },
    );
    const out = res.stdout.replaceAll("\r", "");
    const tail = labTail(res, out);
    const line = (key: string) => out.match(new RegExp(`^${key} ?(.*)$`, "m"))?.[1];
    const section = (s: string) => out.split(`=== ${s}\n`)[1]?.split("\n=== ")[0] ?? "";
    if (Deno.env.get("DVMM_LAB_VERBOSE") === "1") console.log(out);
    const dvmmRate = line("echo 64 MiB ok")?.match(/([\d.]+) MiB\/s/)?.[1];
    const cRate = line("C-ECHO")?.match(/([\d.]+) MiB\/s/)?.[1];
    const qemuRate = line("QEMU-ECHO")?.match(/([\d.]+) MiB\/s/)?.[1];
    console.log(
      `vsock 64 MiB echo: dvmm ${dvmmRate ?? "?"} MiB/s (Deno host client), ${
        cRate ?? "?"
      } MiB/s (C client); ` +
        `QEMU vhost-vsock ${qemuRate ?? line("QEMU-ECHO") ?? "?"}${qemuRate ? " MiB/s (C client)" : ""}`,
    );

    await t.step("the host connects with CONNECT 1024 and gets OK <port>", () => {
      assert.match(out, /^connect-ok OK \d+/m, tail(8000));
    });
    await t.step("64 MiB echo byte-exact through one connection (Deno and C host clients)", () => {
      assert.ok(dvmmRate, tail(8000));
      assert.equal(line("c-echo-exit"), "0", tail(8000));
    });
    await t.step("32 connections at once each echo their own bytes", () => {
      assert.match(out, /^many 32 x 256 KiB ok/m, tail(8000));
      assert.equal(line("host-exit"), "0", tail(6000));
    });
    await t.step("CONNECT to a port nobody listens on is closed (guest RST)", () => {
      assert.equal(line("rst-closed"), "yes");
    });
    await t.step("a guest connection to host port 1025 reaches $D/v.sock_1025", () => {
      assert.equal(line("g2h-host-got"), "hello from the guest", tail(6000));
      assert.equal(line("g2h-reply"), "host got: hello from the guest");
    });
    await t.step("vm.counters and vm.info show the device; the socket is removed at exit", () => {
      const counters = JSON.parse(section("COUNTERS"));
      const v = counters._vsock0;
      assert.ok(v, section("COUNTERS"));
      assert.ok(v.tx_bytes >= 2 * (64 << 20) && v.rx_bytes >= 2 * (64 << 20), JSON.stringify(v));
      const info = JSON.parse(section("INFO"));
      assert.deepEqual(
        [info.config.vsock.id, info.config.vsock.cid, info.config.vsock.socket.endsWith("/v.sock")],
        ["_vsock0", 3, true],
      );
      const pci = info.device_tree["_virtio-pci-_vsock0"];
      assert.ok(pci?.pci_bdf, JSON.stringify(info.device_tree));
      assert.match(out, /^guest-done 0$/m, tail(6000));
      assert.equal(line("dvmm-exit"), "0", tail(4000));
      assert.equal(line("socket-left"), "no");
    });
    await t.step("the guest sees the device as virtio id 19 (PCI 1af4:1053)", () => {
      assert.match(section("OUT"), /^pci 0000:00:0\d\.0 0x1af4 0x1053$/m, section("OUT").slice(-3000));
      assert.match(section("OUT"), /DVMM-GUEST: run exit=0/, section("OUT").slice(-3000));
    });
  } finally {
    await Deno.remove(tool);
  }
});
