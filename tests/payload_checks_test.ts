/**
 * The payload's files are checked before the VM is set up: a FIFO or a device as kernel or initramfs,
 * a missing kernel with 255 vCPUs, an initramfs larger than RAM: each fails at once with the option and
 * the path named, and no vCPU worker is started for a boot that cannot happen.
 */
import assert from "node:assert/strict";
import { checkHugePages, hostMemoryWarning, Vm } from "../vmm/vm.ts";
import { VmConfigSchema } from "../vmm/vm_config.ts";
import { kvmAvailable } from "./helpers/realmode.ts";
import { pvhElf } from "./helpers/tiny_guest.ts";
import { threadNames } from "./helpers/host.ts";

const threads = () => threadNames().length;

const ignore = !kvmAvailable();

Deno.test(
  { name: "payload files that cannot be loaded fail the boot before any set-up", ignore },
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "dvmm-payload-" });
    try {
      await Deno.writeFile(`${dir}/guest.elf`, pvhElf(new Uint8Array([0xf4])));
      const fifo = `${dir}/fifo`;
      const mk = await new Deno.Command("mkfifo", { args: [fifo] }).output();
      assert.ok(mk.success);
      await Deno.writeFile(`${dir}/big.img`, new Uint8Array(0));
      await Deno.truncate(`${dir}/big.img`, 80 << 20);
      const cases: [Record<string, unknown>, Record<string, unknown>, RegExp][] = [
        [{ kernel: fifo }, {}, /--kernel: kernel .*fifo is not a regular file/],
        [{ kernel: "/dev/zero" }, {}, /--kernel: kernel \/dev\/zero is not a regular file/],
        [
          { kernel: `${dir}/guest.elf`, initramfs: fifo },
          {},
          /--initramfs: initramfs .*fifo is not a regular file/,
        ],
        [
          { kernel: `${dir}/missing` },
          { cpus: { boot_vcpus: 255, max_vcpus: 255 } },
          /--kernel: .*missing: no such file/,
        ],
        [{ kernel: `${dir}/guest.elf`, initramfs: `${dir}/big.img` }, {}, /more than the 67108864 that fit/],
        [{ kernel: dir }, {}, /is not a regular file/],
      ];
      for (const [payload, extra, want] of cases) {
        const before = threads();
        const vm = new Vm(VmConfigSchema.parse({
          memory: { size: 64 << 20 },
          payload,
          serial: { mode: "Null" },
          console: { mode: "Off" },
          ...extra,
        }));
        await assert.rejects(vm.boot(), want);
        assert.ok(threads() <= before, `no worker threads were started (${before} → ${threads()})`);
        await vm.shutdown();
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

Deno.test("hugepages: boot refuses when the huge pages are not free, instead of a SIGBUS later", () => {
  const meminfo = (free: number) =>
    `MemTotal: 1000 kB\nHugePages_Total: 64\nHugePages_Free: ${free}\nHugepagesize: 2048 kB\n`;
  assert.throws(
    () => checkHugePages(256 << 20, undefined, meminfo(10)),
    /hugepages=on: 256 MiB of huge pages needed, 20 MiB free/,
  );
  checkHugePages(256 << 20, undefined, meminfo(128)); // 256 MiB free: fine
  assert.throws(() => checkHugePages(256 << 20, 1 << 30, meminfo(128)), /hugepage_size=1073741824/);
});

Deno.test("memory larger than the host's memory and swap is named in a warning", () => {
  const meminfo = "MemTotal: 1048576 kB\nMemFree: 1000 kB\nSwapTotal: 524288 kB\n";
  assert.equal(hostMemoryWarning(1 << 30, meminfo), null);
  assert.match(
    hostMemoryWarning(2 ** 31, meminfo)!,
    /^--memory size=2048 MiB is more than this host's memory and swap \(1536 MiB\)/,
  );
  // The real host: its own size is fine, a terabyte is not.
  assert.equal(hostMemoryWarning(64 << 20), null);
  assert.match(hostMemoryWarning(2 ** 40)!, /more than this host's memory/);
});

Deno.test(
  { name: "hugepages: a VM asking for more huge pages than are free fails with the reason", ignore },
  async () => {
    const free = Number(Deno.readTextFileSync("/proc/meminfo").match(/^HugePages_Free:\s+(\d+)/m)?.[1] ?? 0);
    const dir = await Deno.makeTempDir({ prefix: "dvmm-huge-" });
    try {
      await Deno.writeFile(`${dir}/guest.elf`, pvhElf(new Uint8Array([0xf4])));
      const size = (free + 1) * (2 << 20); // one more than the host has free
      const vm = new Vm(VmConfigSchema.parse({
        memory: { size, hugepages: true },
        payload: { kernel: `${dir}/guest.elf` },
        console: { mode: "Off" },
      }));
      await assert.rejects(vm.boot(), /huge pages needed/);
      await vm.shutdown();
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

Deno.test(
  { name: "disk images: a FIFO or a missing file is refused naming the option and path", ignore },
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "dvmm-disk-" });
    try {
      await Deno.writeFile(`${dir}/guest.elf`, pvhElf(new Uint8Array([0xf4])));
      const mk = await new Deno.Command("mkfifo", { args: [`${dir}/fifo.img`] }).output();
      assert.ok(mk.success);
      for (
        const [path, want] of [
          [
            `${dir}/fifo.img`,
            /--disk _disk0: cannot open the image .*fifo\.img: not a regular file or a block device/,
          ],
          [`${dir}/none.img`, /--disk _disk0: cannot open the image .*none\.img: .*No such file/],
        ] as [string, RegExp][]
      ) {
        const vm = new Vm(VmConfigSchema.parse({
          memory: { size: 64 << 20 },
          payload: { kernel: `${dir}/guest.elf` },
          disks: [{ path, id: "_disk0" }],
          console: { mode: "Off" },
        }));
        await assert.rejects(vm.boot(), want);
        await vm.shutdown();
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);
