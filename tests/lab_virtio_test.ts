/**
 * virtio over PCI in the KVM lab: one boot of the stock Debian guest with virtio-rng (the default
 * device, as in Cloud Hypervisor), a read-write and a read-only virtio-blk disk. The host side writes a
 * token into the rw image; the guest reads it, writes its own token back, checks that the read-only
 * disk refuses writes; after poweroff the lab shell (dvmm's host) prints the sector the guest wrote.
 */
import assert from "node:assert/strict";
import { labTail, labUnavailable, runScriptInLab } from "./helpers/lab.ts";
import { VmConfigSchema } from "../vmm/vm_config.ts";
import type { GuestEvent } from "../vmm/control.ts";
import { Vm } from "../vmm/vm.ts";
import { printAndPoweroffCode, pvhElf } from "./helpers/tiny_guest.ts";
import { kvmAvailable } from "./helpers/realmode.ts";

const why = labUnavailable();

const GUEST = `
echo "=== PCI"
for d in /sys/bus/pci/devices/*; do echo "pci \${d##*/} $(cat $d/vendor) $(cat $d/device)"; done
echo "=== RNG"
echo "rng-current $(cat /sys/class/misc/hw_random/rng_current)"
echo "hwrng-bytes $(head -c 64 /dev/hwrng | wc -c)"
echo "=== BLK"
for b in /sys/block/vd*; do echo "blk \${b##*/} serial=$(cat $b/serial) ro=$(cat $b/ro) size=$(cat $b/size)"; done
rw=""; ro=""
for b in /sys/block/vd*; do
  case "$(cat $b/serial)" in rw.img) rw=/dev/\${b##*/} ;; ro.img) ro=/dev/\${b##*/} ;; esac
done
echo "token-in $(dd if=$rw bs=512 count=1 2>/dev/null | tr -d '\\000')"
echo "token-ro $(dd if=$ro bs=512 count=1 2>/dev/null | tr -d '\\000')"
printf 'guest-token-%s' 73 | dd of=$rw bs=512 seek=1 conv=sync,fsync 2>/dev/null; echo "rw-write-rc $?"
printf 'nope' | dd of=$ro bs=512 seek=1 conv=sync,fsync 2>/dev/null; echo "ro-write-rc $?"
sync
`;

const HOST = (dir: string) => `
set -u
D=/work/${dir}
echo "=== DVMM"
dvmm --kernel /lab/vmlinuz --initramfs /lab/initramfs.gz \\
  --cmdline "console=ttyS0 panic=-1 $(guest-arg < $D/guest.sh)" \\
  --cpus boot=2 --memory size=384M --serial tty --console off \\
  --disk path=$D/rw.img --disk path=$D/ro.img,readonly=on
echo "dvmm-exit $?"
echo "host-sees $(dd if=$D/rw.img bs=512 skip=1 count=1 2>/dev/null | tr -d '\\000')"
echo "host-ro-sector1 $(dd if=$D/ro.img bs=512 skip=1 count=1 2>/dev/null | tr -d '\\000')"
`;

Deno.test({
  name: "lab: virtio-rng and virtio-blk over PCI (rng bytes, disk token round trip, read-only disk)",
  ignore: why !== null,
}, async (t) => {
  const img = (token: string) => {
    const b = new Uint8Array(1 << 20);
    b.set(new TextEncoder().encode(token));
    return b;
  };
  const res = await runScriptInLab(
    "virtio",
    { "rw.img": img("host-token-1234"), "ro.img": img("ro-token-5678"), "guest.sh": GUEST },
    HOST,
    { timeout: 300 },
  );
  const out = res.stdout.replaceAll("\r", "");
  const tail = labTail(res, out);
  const line = (key: string) => out.match(new RegExp(`^${key} (.*)$`, "m"))?.[1];

  await t.step("Linux finds the PCI bus with the host bridge and three virtio devices", () => {
    assert.match(out, /^pci 0000:00:00\.0 0x1b36 0x0008$/m, tail(4000));
    assert.match(out, /^pci 0000:00:01\.0 0x1af4 0x1042$/m, "virtio-blk rw");
    assert.match(out, /^pci 0000:00:02\.0 0x1af4 0x1042$/m, "virtio-blk ro");
    assert.match(out, /^pci 0000:00:03\.0 0x1af4 0x1044$/m, "virtio-rng");
  });
  await t.step("virtio-rng serves /dev/hwrng", () => {
    assert.match(line("rng-current") ?? "", /virtio_rng/, tail(4000));
    assert.equal(line("hwrng-bytes"), "64");
  });
  await t.step("the guest reads the host's token and the read-only flag", () => {
    assert.equal(line("token-in"), "host-token-1234", tail(4000));
    assert.equal(line("token-ro"), "ro-token-5678");
    assert.match(out, /^blk vd\w serial=ro\.img ro=1 size=2048$/m);
    assert.match(out, /^blk vd\w serial=rw\.img ro=0 size=2048$/m);
  });
  await t.step("the guest's write reaches the image; the read-only disk refuses writes", () => {
    assert.equal(line("rw-write-rc"), "0", tail(4000));
    assert.notEqual(line("ro-write-rc"), "0");
    assert.equal(line("dvmm-exit"), "0");
    assert.equal(line("host-sees"), "guest-token-73");
    assert.equal(line("host-ro-sector1"), "");
  });
});

Deno.test({
  name: "native: a VM with a disk and the default rng has PCI device-tree entries and disk counters",
  ignore: !kvmAvailable(),
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-virtio-test-" });
  try {
    await Deno.writeFile(`${dir}/guest.elf`, pvhElf(printAndPoweroffCode("pci\n")));
    await Deno.writeFile(`${dir}/disk.img`, new Uint8Array(1 << 20));
    const vm = new Vm(VmConfigSchema.parse({
      memory: { size: 64 << 20 },
      payload: { kernel: `${dir}/guest.elf` },
      serial: { mode: "Null" },
      console: { mode: "Off" },
      disks: [{ path: `${dir}/disk.img`, readonly: true }],
    }));
    const event = new Promise<GuestEvent>((resolve) => vm.onGuestEvent(resolve));
    await vm.boot();
    try {
      assert.equal(await event, "poweroff");
      const tree = vm.deviceTree() as Record<string, { pci_bdf: string | null; children: string[] }>;
      assert.equal(tree["_virtio-pci-_disk0"].pci_bdf, "0000:00:01.0");
      assert.deepEqual(tree["_virtio-pci-_disk0"].children, ["_disk0"]);
      assert.equal(tree["_virtio-pci-__rng"].pci_bdf, "0000:00:02.0");
      assert.deepEqual(vm.counters(), {
        _disk0: { read_bytes: 0, write_bytes: 0, read_ops: 0, write_ops: 0 },
      });
    } finally {
      await vm.shutdown();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
