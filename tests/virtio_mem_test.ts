/**
 * virtio-mem: the request handler (plug, unplug, unplug all, state; sizes, alignment and ranges refused;
 * hostile chains) and the device on this machine's KVM (its region given to KVM, vm.resize desired_ram
 * reaching requested_size, the counters).
 */
import assert from "node:assert/strict";
import { GuestMemory } from "../vmm/memory.ts";
import { SplitQueue } from "../devices/virtio/queue.ts";
import {
  MEM_BLOCK_SIZE,
  MEM_CONFIG,
  MEM_REQ,
  MEM_RESP,
  MEM_STATE,
  memConfigSpace,
  VirtioMemDevice,
} from "../devices/virtio/mem.ts";
import {
  VIRTIO_ID,
  VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_WRITE as W,
} from "../devices/virtio/constants.ts";
import { FakeDriverQueue } from "./virtio_driver.ts";
import { kvmAvailable } from "./helpers/realmode.ts";
import { VmConfigSchema } from "../vmm/vm_config.ts";
import { Vm } from "../vmm/vm.ts";
import { pvhElf } from "./helpers/tiny_guest.ts";

const REQ = 0x4000, RESP = 0x5000, MiB = 1 << 20, BASE = 0x1_0000_0000;

function setup(requested = 8 * MiB) {
  const mem = GuestMemory.fromBuffers([{ gpa: 0, size: 0x10000 }]);
  const drv = new FakeDriverQueue(mem, 0x1000, 16);
  const q = new SplitQueue(mem, drv.config, {});
  const cfg = new DataView(memConfigSpace({ addr: BASE, regionSize: 64 * MiB, requested }).buffer);
  const discarded: [number, number][] = [];
  const dev = new VirtioMemDevice(
    {
      read: (off) => Number(cfg.getBigUint64(off, true)),
      write: (off, v) => cfg.setBigUint64(off, BigInt(v), true),
    },
    { discard: (off, len) => (discarded.push([off, len]), true) },
  );
  const request = (type: number, addr = 0, blocks = 0) => {
    const b = new Uint8Array(24);
    const v = new DataView(b.buffer);
    v.setUint16(0, type, true);
    v.setBigUint64(8, BigInt(addr), true);
    v.setUint16(16, blocks, true);
    mem.write(REQ, b);
    mem.write(RESP, new Uint8Array(10).fill(0xee));
    drv.setDesc(0, REQ, 24, NEXT, 1);
    drv.setDesc(1, RESP, 10, W);
    const before = drv.usedIdx();
    drv.publish(0);
    dev.service(q);
    const len = drv.used(before).len;
    const r = new DataView(mem.read(RESP, 10).slice().buffer);
    return { len, type: r.getUint16(0, true), state: r.getUint16(8, true) };
  };
  const plugged = () => Number(cfg.getBigUint64(MEM_CONFIG.PLUGGED_SIZE, true));
  return { mem, drv, q, dev, cfg, request, plugged, discarded };
}

Deno.test("virtio-mem: config space as the spec lays it out", () => {
  assert.equal(VIRTIO_ID.MEM, 24);
  const v = new DataView(memConfigSpace({ addr: BASE, regionSize: 256 * MiB, requested: 32 * MiB }).buffer);
  assert.equal(v.byteLength, 56);
  assert.equal(v.getBigUint64(0, true), BigInt(MEM_BLOCK_SIZE));
  assert.equal(v.getBigUint64(16, true), BigInt(BASE));
  assert.equal(v.getBigUint64(24, true), BigInt(256 * MiB));
  assert.equal(v.getBigUint64(32, true), BigInt(256 * MiB));
  assert.equal(v.getBigUint64(40, true), 0n);
  assert.equal(v.getBigUint64(48, true), BigInt(32 * MiB));
});

Deno.test("virtio-mem: plug up to requested_size, state, unplug (memory given back), unplug all", () => {
  const s = setup(8 * MiB);
  assert.deepEqual(s.request(MEM_REQ.PLUG, BASE, 2), { len: 10, type: MEM_RESP.ACK, state: 0 });
  assert.equal(s.plugged(), 4 * MiB);
  // Beyond requested_size: NACK; plugging a plugged block again: ERROR.
  assert.equal(s.request(MEM_REQ.PLUG, BASE + 4 * MiB, 3).type, MEM_RESP.NACK);
  assert.equal(s.request(MEM_REQ.PLUG, BASE, 1).type, MEM_RESP.ERROR);
  assert.equal(s.request(MEM_REQ.PLUG, BASE + 4 * MiB, 2).type, MEM_RESP.ACK);
  assert.equal(s.plugged(), 8 * MiB);
  assert.deepEqual(s.request(MEM_REQ.STATE, BASE, 4), {
    len: 10,
    type: MEM_RESP.ACK,
    state: MEM_STATE.PLUGGED,
  });
  assert.equal(s.request(MEM_REQ.STATE, BASE + 6 * MiB, 2).state, MEM_STATE.MIXED);
  assert.equal(s.request(MEM_REQ.STATE, BASE + 8 * MiB, 2).state, MEM_STATE.UNPLUGGED);
  assert.equal(s.request(MEM_REQ.UNPLUG, BASE + 2 * MiB, 1).type, MEM_RESP.ACK);
  assert.deepEqual(s.discarded, [[2 * MiB, 2 * MiB]]);
  assert.equal(s.plugged(), 6 * MiB);
  assert.equal(s.request(MEM_REQ.UNPLUG, BASE + 2 * MiB, 1).type, MEM_RESP.ERROR); // not plugged
  assert.equal(s.request(MEM_REQ.UNPLUG_ALL).type, MEM_RESP.ACK);
  assert.equal(s.plugged(), 0);
  assert.deepEqual(s.discarded.slice(1), [[0, 2 * MiB], [4 * MiB, 4 * MiB]]);
});

Deno.test("virtio-mem: misaligned, out-of-region and empty ranges, unknown types, short chains", () => {
  const s = setup(64 * MiB);
  assert.equal(s.request(MEM_REQ.PLUG, BASE + 4096, 1).type, MEM_RESP.ERROR);
  assert.equal(s.request(MEM_REQ.PLUG, BASE - 2 * MiB, 1).type, MEM_RESP.ERROR);
  assert.equal(s.request(MEM_REQ.PLUG, BASE + 62 * MiB, 2).type, MEM_RESP.ERROR);
  assert.equal(s.request(MEM_REQ.PLUG, BASE, 0).type, MEM_RESP.ERROR);
  assert.equal(s.request(MEM_REQ.PLUG, 2 ** 60, 0xffff).type, MEM_RESP.ERROR);
  assert.equal(s.request(99).type, MEM_RESP.ERROR);
  assert.equal(s.plugged(), 0);
  // A chain without room for the response is completed with nothing written.
  s.drv.setDesc(0, REQ, 24, NEXT, 1);
  s.drv.setDesc(1, RESP, 4, W);
  const before = s.drv.usedIdx();
  s.drv.publish(0);
  s.dev.service(s.q);
  assert.equal(s.drv.used(before).len, 0);
  assert.equal(s.dev.counters.snapshot().bad_requests, 2);
});

Deno.test({
  name: "virtio-mem in a VM: the device is on PCI, vm.resize desired_ram sets requested_size, checks sizes",
  ignore: !kvmAvailable(),
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-vmem-" });
  await Deno.writeFile(`${dir}/guest.elf`, pvhElf(new Uint8Array([0xeb, 0xfe])));
  const vm = new Vm(VmConfigSchema.parse({
    memory: { size: 64 * MiB, hotplug_size: 256 * MiB, hotplug_method: "VirtioMem" },
    payload: { kernel: `${dir}/guest.elf` },
    serial: { mode: "Null" },
    console: { mode: "Off" },
  }));
  try {
    await vm.boot();
    const tree = vm.deviceTree() as Record<string, { pci_bdf?: string }>;
    assert.ok(tree["_virtio-pci-mem0"]?.pci_bdf, JSON.stringify(Object.keys(tree)));
    await vm.resize({ desired_ram: 192 * MiB });
    await assert.rejects(vm.resize({ desired_ram: 193 * MiB }), /multiple of 2 MiB/);
    await assert.rejects(
      vm.resize({ desired_ram: 512 * MiB }),
      /exceeds memory size plus the usable hotplug_size/,
    );
    // No driver ran, so nothing is plugged: the actual size is the boot RAM.
    assert.equal(vm.memoryActualSize(), 64 * MiB);
    assert.deepEqual(vm.counters()["mem0"], {
      plug_requests: 0,
      unplug_requests: 0,
      refused_requests: 0,
      bad_requests: 0,
    });
  } finally {
    await vm.shutdown();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name: "memory zones: RAM laid out zone after zone (file, shared), each zone's virtio-mem, resize-zone",
  ignore: !kvmAvailable(),
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-zones-" });
  await Deno.writeFile(`${dir}/guest.elf`, pvhElf(new Uint8Array([0xeb, 0xfe])));
  await Deno.mkdir(`${dir}/zfiles`);
  const vm = new Vm(VmConfigSchema.parse({
    memory: {
      size: 0,
      hotplug_method: "VirtioMem",
      zones: [
        { id: "z0", size: 32 * MiB },
        { id: "z1", size: 64 * MiB, shared: true, hotplug_size: 128 * MiB },
        { id: "z2", size: 16 * MiB, file: `${dir}/zfiles` },
      ],
    },
    payload: { kernel: `${dir}/guest.elf` },
    serial: { mode: "Null" },
    console: { mode: "Off" },
  }));
  try {
    await vm.boot();
    // 112 MiB of RAM from 0: z0, then z1, then z2, one after the other.
    const mem = vm.memory!;
    assert.equal(mem.size, 112 * MiB);
    mem.write(32 * MiB + 5, new Uint8Array([0xa5]));
    assert.equal(mem.read(32 * MiB + 5, 1)[0], 0xa5);
    assert.equal(vm.memoryActualSize(), 112 * MiB);
    const tree = vm.deviceTree() as Record<string, { pci_bdf?: string }>;
    assert.ok(tree["_virtio-pci-z1"]?.pci_bdf, "z1's virtio-mem device, named after the zone");
    assert.equal(tree["_virtio-pci-z0"], undefined);
    await vm.resizeZone("z1", 128 * MiB);
    await assert.rejects(vm.resizeZone("z1", 256 * MiB), /exceeds memory size plus the usable hotplug_size/);
    await assert.rejects(vm.resizeZone("z0", 64 * MiB), /memory zone 'z0' has no hotplug_size/);
    await assert.rejects(vm.resize({ desired_ram: 256 * MiB }), /resize them with vm.resize-zone/);
  } finally {
    await vm.shutdown();
    await Deno.remove(dir, { recursive: true });
  }
});
