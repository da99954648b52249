/**
 * Kata Containers' whole CreateVM body (the client-compatibility issue's, with the lab's paths) boots
 * the lab's default guest under dvmm, driven over the REST API as Kata drives it:
 * - virtio-fs `kataShared` on PCI segment 1 (of `platform.num_pci_segments: 2`) with a real virtiofsd;
 * - the vsock device with Kata's hybrid socket; the guest answers on vsock port 1024;
 * - 2 GiB of shared memory with Kata's `hotplug_size` (kept address space), boot 1 of max 2 vCPUs,
 *   a read-only disk, serial and console off (so the guest is observed through the share and vsock).
 */
import assert from "node:assert/strict";
import { labTail, labUnavailable, runScriptInLab } from "./helpers/lab.ts";

const why = labUnavailable();
const root = new URL("../", import.meta.url).pathname;

const GUEST = `
mount -t virtiofs kataShared /mnt && cat /mnt/token.txt >/mnt/from-guest.txt
echo "pci $(ls /sys/bus/pci/devices | tr '\\n' ' ')" >>/mnt/from-guest.txt
vsock listen 1024 >/dev/null 2>&1 &
sleep 600
`;

/** Kata's CreateVM body, as the client-compatibility issue gives it, with the lab's paths filled in. */
const kataBody = (d: string, cmdline: string) => ({
  console: { iommu: false, mode: "Off" },
  cpus: {
    boot_vcpus: 1,
    kvm_hyperv: false,
    max_vcpus: 2,
    nested: true,
    topology: { cores_per_die: 2, dies_per_package: 1, packages: 1, threads_per_core: 1 },
  },
  disks: [{
    backing_files: false,
    direct: false,
    image_type: "Raw",
    iommu: false,
    num_queues: 1,
    path: `${d}/image.img`,
    queue_size: 128,
    readonly: true,
    sparse: true,
    vhost_user: false,
  }],
  fs: [{ num_queues: 1, pci_segment: 1, queue_size: 1024, socket: `${d}/vfsd.sock`, tag: "kataShared" }],
  iommu: false,
  landlock_enable: false,
  memory: {
    hotplug_method: "Acpi",
    hotplug_size: 25275924480,
    hugepages: false,
    mergeable: false,
    prefault: false,
    shared: true,
    size: 2147483648,
    thp: true,
  },
  payload: { cmdline, kernel: "/lab/vmlinuz", initramfs: "/lab/initramfs.gz" },
  platform: { num_pci_segments: 2, sev_snp: false, tdx: false },
  pvpanic: false,
  rng: { iommu: false, src: "/dev/urandom" },
  serial: { iommu: false, mode: "Off" },
  vsock: { cid: 3, iommu: false, socket: `${d}/vsock.sock` },
  watchdog: false,
});

const HOST = (dir: string) => `
set -u
D=/work/${dir}
VFS=$(command -v virtiofsd || echo /usr/lib/qemu/virtiofsd)
mkdir -p $D/share
echo kata-token-7070 >$D/share/token.txt
dd if=/dev/zero of=$D/image.img bs=1M count=16 2>/dev/null
$VFS --socket-path=$D/vfsd.sock -o source=$D/share -o cache=none -o sandbox=chroot >$D/vfs.log 2>&1 &
i=0; while [ ! -S $D/vfsd.sock ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done
dvmm --api-socket path=$D/api.sock >$D/out.txt 2>$D/err.txt &
pid=$!
i=0; while [ ! -S $D/api.sock ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done
api() { curl -s -o $D/body -w "CALL $2 %{http_code}\\n" --unix-socket $D/api.sock -X "$1" \\
  -H 'Content-Type: application/json' \${3:+-d @$3} "http://localhost/api/v1/$2"; cat $D/body; echo; }
api PUT vm.create $D/kata.json
api PUT vm.boot
i=0; while ! grep -q "^pci " $D/share/from-guest.txt 2>/dev/null && [ $i -lt 900 ]; do sleep 0.5; i=$((i+1)); done
echo "=== FROM-GUEST"; cat $D/share/from-guest.txt
echo "=== ECHO"; $D/vsock unix-echo-test $D/vsock.sock 1024 1 2>&1
api GET vm.info
api PUT vmm.shutdown
wait $pid
echo "dvmm-exit $?"
echo "=== ERR"; tail -20 $D/err.txt
`;

Deno.test({
  name: "lab: Kata's whole CreateVM body boots: kataShared on PCI segment 1 mounts, vsock port 1024 answers",
  ignore: why !== null,
}, async (t) => {
  // The host side of the vsock check is the guest tool itself, built here (static) for the lab.
  const tool = await Deno.makeTempFile({ prefix: "dvmm-vsock-" });
  const cc = await new Deno.Command("gcc", {
    args: ["-static", "-O2", "-o", tool, `${root}tests/lab/guest-tools/vsock.c`],
  }).output();
  assert.ok(cc.success, new TextDecoder().decode(cc.stderr));
  const guestArg = new TextDecoder().decode(
    (await new Deno.Command(`${root}tests/lab/guest-arg`, { args: [GUEST] }).output()).stdout,
  ).trim();
  let res;
  try {
    res = await runScriptInLab(
      "kata",
      {
        vsock: await Deno.readFile(tool),
        // The paths inside the lab are only known once the directory is named: filled in by run.sh.
        "kata.template.json": JSON.stringify(kataBody("@DIR@", `console=ttyS0 panic=-1 ${guestArg}`)),
      },
      (name) =>
        `chmod +x /work/${name}/vsock; sed "s#@DIR@#/work/${name}#g" /work/${name}/kata.template.json ` +
        `>/work/${name}/kata.json\n${HOST(name)}`,
      { timeout: 300 },
    );
  } finally {
    await Deno.remove(tool);
  }
  const out = res.stdout.replaceAll("\r", "");
  const tail = labTail(res, out);
  const status = (endpoint: string) => out.match(new RegExp(`^CALL ${endpoint} (\\d+)`, "m"))?.[1];
  const section = (s: string) => out.split(`=== ${s}\n`)[1]?.split("\n=== ")[0] ?? "";

  await t.step("create and boot answer 204", () => {
    assert.equal(status("vm.create"), "204", tail(5000));
    assert.equal(status("vm.boot"), "204", tail(5000));
  });
  await t.step("the guest mounted kataShared (virtio-fs on segment 1) and wrote through it", () => {
    const g = section("FROM-GUEST");
    assert.match(g, /^kata-token-7070$/m, tail(5000));
    assert.match(g, /0001:00:01\.0/, "the fs device sits on PCI segment 1");
  });
  await t.step("the guest answers on vsock port 1024 through Kata's hybrid socket", () => {
    assert.match(section("ECHO"), /echo-test 1 MiB ok/, tail(5000));
  });
  await t.step("vm.info reports the segment-1 device; the VMM shuts down cleanly", () => {
    const info = JSON.parse(out.match(/^\{"config".*$/m)?.[0] ?? "{}");
    const tree = info.device_tree ?? {};
    const fsNode = Object.values(tree).find((n) =>
      (n as { children?: string[] }).children?.some((c) => c.startsWith("_fs"))
    ) as { pci_bdf?: string } | undefined;
    assert.equal(fsNode?.pci_bdf, "0001:00:01.0", JSON.stringify(tree).slice(0, 2000));
    assert.equal(status("vmm.shutdown"), "204");
    assert.match(out, /^dvmm-exit 0$/m, tail(3000));
  });
});
