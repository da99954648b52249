/**
 * virtio-pmem: the request handler (flush, unknown types, hostile chains), the host-side file checks
 * and placement, and the real mapping semantics (shared vs discard_writes) on this machine's KVM.
 */
import assert from "node:assert/strict";
import { GuestMemory } from "../vmm/memory.ts";
import { SplitQueue } from "../devices/virtio/queue.ts";
import {
  PMEM_ALIGN,
  PMEM_REQ_FLUSH,
  PMEM_RESP_EIO,
  PMEM_RESP_OK,
  pmemConfigSpace,
  PmemDevice,
  pmemFeatures,
} from "../devices/virtio/pmem.ts";
import {
  FdPmemBackend,
  openPmemFile,
  placePmem,
  PMEM_FIRST_SLOT,
  PmemRegions,
  pmemSize,
} from "../devices/virtio/device_pmem.ts";
import {
  F,
  featureBit,
  VIRTIO_ID,
  VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_WRITE as W,
} from "../devices/virtio/constants.ts";
import { FakeDriverQueue } from "./virtio_driver.ts";
import { shim } from "../ffi/shim.ts";
import { Kvm, mappingBytes } from "../ffi/kvm.ts";
import { kvmAvailable } from "./helpers/realmode.ts";
import { PmemConfigSchema, VmConfigSchema } from "../vmm/vm_config.ts";
import type { GuestEvent } from "../vmm/control.ts";
import { Vm } from "../vmm/vm.ts";
import { mmio64Window } from "../vmm/layout.ts";
import { printAndPoweroffCode, pvhElf } from "./helpers/tiny_guest.ts";

const REQ = 0x4000, RESP = 0x5000, MiB = 1 << 20;

function setup(opts: { discard?: boolean; fail?: boolean } = {}) {
  const mem = GuestMemory.fromBuffers([{ gpa: 0, size: 0x10000 }]);
  const drv = new FakeDriverQueue(mem, 0x1000, 16);
  const q = new SplitQueue(mem, drv.config, {});
  let flushes = 0;
  const dev = new PmemDevice({
    flush() {
      flushes++;
      if (opts.fail) throw new Error("EIO");
    },
  }, opts.discard);
  /** Publishes chain 0 and runs the queue; returns the used length and the status word. */
  const run = () => {
    mem.writeU32(RESP, 0xdeadbeef);
    const before = drv.usedIdx();
    drv.publish(0);
    const irq = dev.service(q);
    assert.equal(drv.usedIdx(), (before + 1) & 0xffff);
    return { len: drv.used(before).len, status: mem.readU32(RESP), irq };
  };
  const request = (type: number) => {
    mem.writeU32(REQ, type);
    drv.setDesc(0, REQ, 4, NEXT, 1);
    drv.setDesc(1, RESP, 4, W);
    return run();
  };
  return { mem, drv, q, dev, run, request, flushes: () => flushes };
}

Deno.test("pmem: features and config space", () => {
  assert.equal(pmemFeatures(), featureBit(F.VERSION_1));
  assert.equal(VIRTIO_ID.PMEM, 27);
  const v = new DataView(pmemConfigSpace(0x1_0000_0000, 64 * MiB).buffer);
  assert.equal(v.byteLength, 16);
  assert.equal(v.getBigUint64(0, true), 0x1_0000_0000n);
  assert.equal(v.getBigUint64(8, true), BigInt(64 * MiB));
});

Deno.test("pmem: flush syncs the file and answers OK; discard_writes answers OK without syncing", () => {
  const s = setup();
  assert.deepEqual(s.request(PMEM_REQ_FLUSH), { len: 4, status: PMEM_RESP_OK, irq: true });
  assert.equal(s.flushes(), 1);
  assert.equal(s.dev.counters.snapshot().flush_ops, 1);

  const d = setup({ discard: true });
  assert.deepEqual(d.request(PMEM_REQ_FLUSH), { len: 4, status: PMEM_RESP_OK, irq: true });
  assert.equal(d.flushes(), 0);
});

Deno.test("pmem: a failed flush and an unknown request type are answered EIO", () => {
  const s = setup({ fail: true });
  assert.equal(s.request(PMEM_REQ_FLUSH).status, PMEM_RESP_EIO);
  assert.equal(s.dev.counters.snapshot().flush_errors, 1);
  const u = setup();
  for (const type of [1, 2, 0xffffffff]) {
    assert.deepEqual(u.request(type), { len: 4, status: PMEM_RESP_EIO, irq: true });
  }
  assert.equal(u.flushes(), 0);
  assert.equal(u.dev.counters.snapshot().bad_requests, 3);
});

Deno.test("pmem: request and status split over several descriptors (any layout)", () => {
  const s = setup();
  s.mem.writeU32(REQ, 0); // type FLUSH as 2 + 2 bytes
  s.drv.setDesc(0, REQ, 2, NEXT, 1);
  s.drv.setDesc(1, REQ + 2, 2, NEXT, 2);
  s.drv.setDesc(2, RESP, 1, NEXT | W, 3); // status as 1 + 7 bytes
  s.drv.setDesc(3, RESP + 1, 7, W);
  const r = s.run();
  assert.equal(r.len, 4);
  assert.equal(r.status, PMEM_RESP_OK);
  assert.equal(s.flushes(), 1);
});

Deno.test("pmem: hostile chains are completed without an answer and without touching memory", async (t) => {
  const cases: [string, (s: ReturnType<typeof setup>) => void][] = [
    ["no status buffer", (s) => s.drv.setDesc(0, REQ, 4)],
    ["status buffer too short", (s) => {
      s.drv.setDesc(0, REQ, 4, NEXT, 1);
      s.drv.setDesc(1, RESP, 3, W);
    }],
    ["request too short", (s) => {
      s.drv.setDesc(0, REQ, 3, NEXT, 1);
      s.drv.setDesc(1, RESP, 4, W);
    }],
    ["only a status buffer", (s) => s.drv.setDesc(0, RESP, 4, W)],
    ["status before request (readable after writable)", (s) => {
      s.drv.setDesc(0, RESP, 4, NEXT | W, 1);
      s.drv.setDesc(1, REQ, 4);
    }],
    ["status outside guest RAM", (s) => {
      s.drv.setDesc(0, REQ, 4, NEXT, 1);
      s.drv.setDesc(1, 0xfffe, 4, W);
    }],
    ["request at a huge address", (s) => {
      s.drv.setDesc(0, 2 ** 52, 4, NEXT, 1);
      s.drv.setDesc(1, RESP, 4, W);
    }],
    ["a loop", (s) => {
      s.drv.setDesc(0, REQ, 4, NEXT, 1);
      s.drv.setDesc(1, RESP, 4, NEXT | W, 0);
    }],
    ["next out of range", (s) => s.drv.setDesc(0, REQ, 4, NEXT, 99)],
    ["indirect without the feature", (s) => s.drv.setDesc(0, 0x6000, 32, 4)],
  ];
  for (const [name, build] of cases) {
    await t.step(name, () => {
      const s = setup();
      s.mem.writeU32(REQ, PMEM_REQ_FLUSH);
      build(s);
      const r = s.run();
      assert.equal(r.len, 0);
      assert.equal(r.status, 0xdeadbeef);
      assert.equal(s.flushes(), 0);
      assert.equal(s.dev.counters.snapshot().bad_requests, 1);
    });
  }
  await t.step("a head index out of range is skipped; the queue goes on", () => {
    const s = setup();
    s.drv.publish(200);
    assert.equal(s.dev.service(s.q), false);
    assert.equal(s.drv.usedIdx(), 0);
    assert.equal(s.request(PMEM_REQ_FLUSH).status, PMEM_RESP_OK);
  });
  await t.step("an available index jump breaks the queue (no chain is touched)", () => {
    const s = setup();
    s.drv.setAvailIdx(100);
    s.dev.service(s.q);
    assert.notEqual(s.q.broken, null);
    assert.equal(s.drv.usedIdx(), 0);
    assert.equal(s.flushes(), 0);
  });
});

Deno.test("pmem: region size rules (2 MiB multiples, file size, directories) and placement", () => {
  assert.equal(pmemSize("p", 4 * MiB, undefined, false), 4 * MiB);
  assert.equal(pmemSize("p", 8 * MiB, 2 * MiB, false), 2 * MiB);
  assert.equal(pmemSize("p", 0, 6 * MiB, true), 6 * MiB);
  assert.throws(() => pmemSize("p", 3 * MiB, undefined, false), /not a multiple of 2 MiB/);
  assert.throws(() => pmemSize("p", 4 * MiB, 4 * MiB + 4096, false), /larger than the file/);
  assert.throws(() => pmemSize("p", 0, undefined, false), /empty/);
  assert.throws(() => pmemSize("p", 0, undefined, true), /directory needs size/);
  assert.throws(() => pmemSize("p", 8 * MiB, 1 * MiB, false), /not a multiple of 2 MiB/);

  const w = { start: 0x1_0000_0000, size: 64 * MiB };
  assert.equal(placePmem(w, w.start, 4 * MiB), w.start);
  assert.equal(placePmem(w, w.start + 4096, 2 * MiB), w.start + PMEM_ALIGN);
  assert.equal(placePmem(w, 0, 2 * MiB), w.start);
  assert.equal(placePmem(w, w.start, 64 * MiB), w.start);
  assert.equal(placePmem(w, w.start + 2 * MiB, 64 * MiB), null);
  assert.equal(placePmem(w, w.start, 2 ** 60), null);
});

Deno.test("pmem: backing files: read-write, read-only with discard_writes, temporary in a directory", () => {
  const dir = Deno.makeTempDirSync({ prefix: "dvmm-pmem-" });
  const s = shim();
  try {
    const file = `${dir}/img`;
    Deno.writeFileSync(file, new Uint8Array(4 * MiB));
    const cfg = (o: Record<string, unknown>) => PmemConfigSchema.parse(o);

    const rw = openPmemFile(cfg({ file }), "p");
    assert.equal(rw.size, 4 * MiB);
    assert.equal(Number(s.kvs_pwrite(rw.fd, new Uint8Array([1]), 1, 0)), 1);
    new FdPmemBackend(rw.fd).flush();
    s.kvs_close(rw.fd);

    const ro = openPmemFile(cfg({ file, discard_writes: true }), "p");
    assert.ok(Number(s.kvs_pwrite(ro.fd, new Uint8Array([1]), 1, 0)) < 0, "read-only fd");
    s.kvs_close(ro.fd);

    const tmp = openPmemFile(cfg({ file: dir, size: 2 * MiB }), "p");
    assert.equal(tmp.size, 2 * MiB);
    assert.deepEqual(
      [...Deno.readDirSync(dir)].map((e) => e.name),
      ["img"],
      "the temporary file has no name",
    );
    s.kvs_close(tmp.fd);

    assert.throws(() => openPmemFile(cfg({ file: dir }), "p"), /directory needs size/);
    Deno.writeFileSync(`${dir}/odd`, new Uint8Array(MiB));
    assert.throws(() => openPmemFile(cfg({ file: `${dir}/odd` }), "p"), /multiple of 2 MiB/);
    assert.throws(
      () => openPmemFile(cfg({ file: `${dir}/missing` }), "--pmem"),
      /^Error: --pmem: .*\/missing: No such file/,
    );
    // A FIFO would block the open forever; a character device has no size to map: refused at once.
    assert.ok(new Deno.Command("mkfifo", { args: [`${dir}/fifo`] }).outputSync().success);
    assert.throws(() => openPmemFile(cfg({ file: `${dir}/fifo` }), "--pmem"), /fifo is not a regular file/);
    assert.throws(
      () => openPmemFile(cfg({ file: "/dev/zero", size: 2 * MiB }), "--pmem"),
      /not a regular file/,
    );
    assert.throws(() => new FdPmemBackend(-1).flush(), /fsync/);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test({
  name: "pmem: regions become KVM slots; shared mappings reach the file, discard_writes ones never do",
  ignore: !kvmAvailable(),
}, () => {
  const dir = Deno.makeTempDirSync({ prefix: "dvmm-pmem-" });
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const regions = new PmemRegions(vm, { start: 0x1_0000_0000, size: 64 * MiB });
  try {
    const a = `${dir}/a`, b = `${dir}/b`;
    const content = new Uint8Array(2 * MiB).fill(0x41);
    Deno.writeFileSync(a, content);
    Deno.writeFileSync(b, new Uint8Array(4 * MiB).fill(0x42));
    const ra = regions.add(PmemConfigSchema.parse({ file: a }), "_pmem0");
    const rb = regions.add(PmemConfigSchema.parse({ file: b, discard_writes: true }), "_pmem1");
    assert.deepEqual([ra.gpa, ra.size, ra.slot], [0x1_0000_0000, 2 * MiB, PMEM_FIRST_SLOT]);
    assert.deepEqual([rb.gpa, rb.size, rb.slot], [0x1_0000_0000 + 2 * MiB, 4 * MiB, PMEM_FIRST_SLOT + 1]);
    assert.equal(regions.end, 0x1_0000_0000 + 6 * MiB);

    const va = mappingBytes({ hostAddr: ra.hostAddr, size: ra.size });
    const vb = mappingBytes({ hostAddr: rb.hostAddr, size: rb.size });
    assert.equal(va[0], 0x41);
    assert.equal(vb[4 * MiB - 1], 0x42);
    va.set(new TextEncoder().encode("written"), 100);
    vb.set(new TextEncoder().encode("discarded"), 100);
    new FdPmemBackend(ra.fd).flush();
    assert.equal(new TextDecoder().decode(Deno.readFileSync(a).subarray(100, 107)), "written");
    assert.ok(Deno.readFileSync(b).every((x) => x === 0x42), "the discard_writes file is unchanged");
    assert.equal(new TextDecoder().decode(vb.subarray(100, 109)), "discarded", "the guest sees its write");

    // No room left in the window: refused, nothing leaks.
    Deno.writeFileSync(`${dir}/big`, new Uint8Array(0));
    Deno.truncateSync(`${dir}/big`, 64 * MiB);
    assert.throws(() => regions.add(PmemConfigSchema.parse({ file: `${dir}/big` }), "_pmem2"), /no room/);
    assert.equal(regions.regions.length, 2);
  } finally {
    regions.close();
    vm.close();
    kvm.close();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test({
  name: "pmem and balloon wired into a VM: slot, device tree, counters, memory_actual_size, resize",
  ignore: !kvmAvailable(),
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-pmem-vm-" });
  await Deno.writeFile(`${dir}/guest.elf`, pvhElf(printAndPoweroffCode("up\n")));
  await Deno.writeFile(`${dir}/p.img`, new Uint8Array(2 * MiB).fill(7));
  const config = VmConfigSchema.parse({
    cpus: { boot_vcpus: 1, max_vcpus: 1 },
    memory: { size: 64 * MiB },
    payload: { kernel: `${dir}/guest.elf` },
    serial: { mode: "Null" },
    console: { mode: "Off" },
    pmem: [{ file: `${dir}/p.img`, id: "pm0" }],
    balloon: { size: 16 * MiB },
  });
  const vm = new Vm(config);
  const event = new Promise<GuestEvent>((resolve) => vm.onGuestEvent(resolve));
  try {
    await vm.boot();
    assert.equal(await event, "poweroff");
    const m64 = mmio64Window(64 * MiB).start;
    const tree = vm.deviceTree() as Record<string, { resources: unknown[]; parent?: string }>;
    assert.deepEqual(tree.pm0.resources, [{ MmioAddressRange: { base: m64, size: 2 * MiB } }]);
    assert.equal(tree.pm0.parent, "_virtio-pci-pm0");
    assert.ok(tree.__balloon);
    const c = vm.counters();
    assert.deepEqual(c.pm0, { flush_ops: 0, flush_errors: 0, bad_requests: 0 });
    assert.equal(c.__balloon.target_bytes, 16 * MiB);
    assert.equal(c.__balloon.actual_bytes, 0); // no driver ran
    assert.equal(vm.memoryActualSize(), 64 * MiB);
    await vm.resize({ desired_balloon: 8 * MiB });
    assert.equal(vm.counters().__balloon.target_bytes, 8 * MiB);
    await assert.rejects(vm.resize({ desired_vcpus: 2 }), /must be between 1 and max_vcpus \(1\)/);
    await assert.rejects(
      vm.resize({ desired_ram: 128 * MiB }),
      /the VM has no memory hotplug region/,
    );
    await vm.resize({ desired_vcpus: 1, desired_ram: 64 * MiB }); // no change: nothing to do
  } finally {
    await vm.shutdown();
    await Deno.remove(dir, { recursive: true });
  }
});
