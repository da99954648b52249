/**
 * Virtqueue fuzzer over the device handlers (blk, rng, pmem, virtio-mem, balloon): random rings built the
 * way a hostile driver would (descriptor tables with wild addresses, lengths, flags and loops, indirect
 * tables, avail indices far ahead), run through each device, with an independent reference check:
 *
 * - nothing escapes as an exception (a guest-controlled ring must never kill a device worker);
 * - the device writes guest memory only inside descriptors the driver marked device-writable (any table,
 *   direct or indirect) or the used ring: every other byte is compared before and after;
 * - every used length is at most the writable bytes of the whole table (a device never claims more than
 *   the driver offered).
 *
 * `make test` runs a bounded number of episodes (DVMM_FUZZ_EPISODES, default 3000, seeded, so a failure
 * names its seed and replays); `make fuzz` runs many more and prints the counts.
 */
import assert from "node:assert/strict";
import { type Seeded, seeded } from "./helpers/seeded.ts";
import { GuestMemory } from "../vmm/memory.ts";
import { ringSizes, SplitQueue } from "../devices/virtio/queue.ts";
import { BlkDevice, MemoryDisk } from "../devices/virtio/blk.ts";
import { RngDevice } from "../devices/virtio/rng.ts";
import { PmemDevice } from "../devices/virtio/pmem.ts";
import { memConfigSpace, VirtioMemDevice } from "../devices/virtio/mem.ts";
import { BalloonDevice } from "../devices/virtio/balloon.ts";
import {
  VIRTQ_DESC_F_INDIRECT as INDIRECT,
  VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_WRITE as W,
} from "../devices/virtio/constants.ts";

const MEM_SIZE = 0x20000;
const RING = 0x1000;
const QSIZE = 16;

type Device = { name: string; make: (mem: GuestMemory) => (q: SplitQueue) => void };

const DEVICES: Device[] = [
  {
    name: "blk",
    make: () => {
      const d = new BlkDevice(new MemoryDisk(64 * 512, false, "fuzz"));
      return (q) => void d.processQueue(q);
    },
  },
  {
    name: "rng",
    make: () => {
      const d = new RngDevice({ fill: (b: Uint8Array) => b.fill(0x42) } as never);
      return (q) => void d.processQueue(q);
    },
  },
  {
    name: "pmem",
    make: () => {
      const d = new PmemDevice({ flush() {} });
      return (q) => void d.service(q);
    },
  },
  {
    name: "virtio-mem",
    make: () => {
      const cfg = new DataView(
        memConfigSpace({ addr: 0x1_0000_0000, regionSize: 64 << 20, requested: 8 << 20 }).buffer,
      );
      const d = new VirtioMemDevice({
        read: (o) => Number(cfg.getBigUint64(o, true)),
        write: (o, v) => cfg.setBigUint64(o, BigInt(v), true),
      }, { discard: () => true });
      return (q) => void d.service(q);
    },
  },
  {
    name: "balloon",
    make: (mem) => {
      const d = new BalloonDevice({ release: () => true }, mem);
      return (q) => void d.service(q, 0);
    },
  },
];

/** A random descriptor: mostly inside memory, sometimes anywhere; random flags and next. */
function randomDesc(r: Seeded) {
  const wild = r.chance(0.1);
  const addr = wild ? r.u32() * (r.chance(0.5) ? 2 ** 20 : 1) : 0x4000 + r.below(MEM_SIZE - 0x4000);
  const len = r.chance(0.1) ? r.u32() : r.below(r.chance(0.5) ? 64 : 0x3000);
  let flags = 0;
  if (r.chance(0.5)) flags |= NEXT;
  if (r.chance(0.5)) flags |= W;
  if (r.chance(0.08)) flags |= INDIRECT;
  if (r.chance(0.02)) flags |= r.below(0x10000);
  return { addr, len, flags, next: r.chance(0.9) ? r.below(QSIZE) : r.below(0x10000) };
}

function writeDesc(mem: GuestMemory, at: number, d: ReturnType<typeof randomDesc>): void {
  if (!mem.contains(at, 16)) return;
  mem.writeU64(at, d.addr);
  mem.writeU32(at + 8, d.len >>> 0);
  mem.writeU16(at + 12, d.flags & 0xffff);
  mem.writeU16(at + 14, d.next & 0xffff);
}

/** Marks the bytes the device may write: every writable descriptor (direct or in an indirect table). */
function allowedWrites(mem: GuestMemory, descAddr: number, usedAddr: number, usedLen: number): Uint8Array {
  const ok = new Uint8Array(MEM_SIZE);
  const mark = (addr: number, len: number) => {
    const end = Math.min(MEM_SIZE, addr + len);
    for (let i = Math.max(0, addr); i < end; i++) ok[i] = 1;
  };
  mark(usedAddr, usedLen);
  const visit = (table: number, count: number, depth: number) => {
    for (let i = 0; i < count; i++) {
      const o = table + 16 * i;
      if (!mem.contains(o, 16)) return;
      const addr = Number(mem.readU64Big(o));
      const len = mem.readU32(o + 8);
      const flags = mem.readU16(o + 12);
      if (flags & W) mark(addr, len);
      if (flags & INDIRECT && depth === 0 && addr < MEM_SIZE) {
        visit(addr, Math.min(Math.floor(len / 16), 256), 1);
      }
    }
  };
  visit(descAddr, QSIZE, 0);
  return ok;
}

function writableTotal(mem: GuestMemory, descAddr: number): number {
  let total = 0;
  const visit = (table: number, count: number, depth: number) => {
    for (let i = 0; i < count; i++) {
      const o = table + 16 * i;
      if (!mem.contains(o, 16)) return;
      const addr = Number(mem.readU64Big(o));
      const len = mem.readU32(o + 8);
      const flags = mem.readU16(o + 12);
      if (flags & W) total += len;
      if (flags & INDIRECT && depth === 0 && addr < MEM_SIZE) {
        visit(addr, Math.min(Math.floor(len / 16), 256), 1);
      }
    }
  };
  visit(descAddr, QSIZE, 0);
  return total;
}

/** Runs `episodes` random episodes against every device; returns counts. */
export function fuzzVirtqueues(seed: number, episodes: number, devices: Device[] = DEVICES) {
  const counts = { episodes: 0, chains: 0, broken: 0 };
  for (let e = 0; e < episodes; e++) {
    const dev = devices[e % devices.length];
    const s = seed + e;
    const r = seeded(s);
    const mem = GuestMemory.fromBuffers([{ gpa: 0, size: MEM_SIZE }]);
    const sizes = ringSizes(QSIZE);
    const descAddr = RING, driverAddr = RING + sizes.desc;
    const deviceAddr = (driverAddr + sizes.avail + 3) & ~3;
    // Random payload bytes everywhere (requests read from here), then the tables.
    for (let i = 0x4000; i < MEM_SIZE; i += 4) mem.writeU32(i, r.u32());
    for (let i = 0; i < QSIZE; i++) writeDesc(mem, descAddr + 16 * i, randomDesc(r));
    for (let t = 0; t < 3; t++) {
      const table = 0x8000 + r.below(0x10000);
      for (let i = 0; i < 8; i++) writeDesc(mem, table + 16 * i, randomDesc(r));
    }
    const avail = r.chance(0.1) ? r.below(0x10000) : r.below(QSIZE * 2);
    mem.writeU16(driverAddr, r.below(2));
    mem.writeU16(driverAddr + 2, avail);
    for (let i = 0; i < QSIZE; i++) {
      mem.writeU16(driverAddr + 4 + 2 * i, r.chance(0.9) ? r.below(QSIZE) : r.below(0x10000));
    }
    const q = new SplitQueue(mem, { size: QSIZE, descAddr, driverAddr, deviceAddr }, {
      eventIdx: r.chance(0.5),
      indirect: true,
    });
    const allowed = allowedWrites(mem, descAddr, deviceAddr, sizes.used);
    const before = mem.read(0, MEM_SIZE).slice();
    const writable = writableTotal(mem, descAddr);
    const usedBefore = mem.readU16(deviceAddr + 2);
    try {
      dev.make(mem)(q);
    } catch (err) {
      throw new Error(`${dev.name}, seed ${s}: the handler threw: ${(err as Error).stack}`);
    }
    const after = mem.read(0, MEM_SIZE);
    for (let i = 0; i < MEM_SIZE; i++) {
      if (before[i] !== after[i] && !allowed[i]) {
        throw new Error(
          `${dev.name}, seed ${s}: wrote byte 0x${i.toString(16)} outside every writable descriptor`,
        );
      }
    }
    const produced = (mem.readU16(deviceAddr + 2) - usedBefore) & 0xffff;
    for (let k = 0; k < Math.min(produced, QSIZE); k++) {
      const len = mem.readU32(deviceAddr + 4 + 8 * ((usedBefore + k) % QSIZE) + 4);
      if (len > writable) {
        throw new Error(`${dev.name}, seed ${s}: used length ${len} > ${writable} writable bytes`);
      }
    }
    counts.episodes++;
    counts.chains += produced;
    if (q.broken !== null) counts.broken++;
  }
  return counts;
}

Deno.test("fuzz: virtqueues over blk, rng, pmem, virtio-mem, balloon: no throw, no write outside the driver's buffers", () => {
  const episodes = Number(Deno.env.get("DVMM_FUZZ_EPISODES") ?? 3000);
  const seed = Number(Deno.env.get("DVMM_FUZZ_SEED") ?? 0x5eed);
  const t0 = performance.now();
  const c = fuzzVirtqueues(seed, episodes);
  console.log(
    `virtqueue fuzzer: ${c.episodes} episodes (seed ${seed}), ${c.chains} chains completed, ` +
      `${c.broken} rings refused as broken, ${((performance.now() - t0) / 1000).toFixed(1)} s`,
  );
  assert.equal(c.episodes, episodes);
});

Deno.test("fuzz: the reference check catches a device that writes into a device-readable buffer", () => {
  // A wrong device: it answers into the first buffer of every chain, readable or not.
  const careless: Device = {
    name: "careless",
    make: (mem) => (q) => {
      for (;;) {
        const chain = q.popChain();
        if (chain === null || q.broken !== null) break;
        if (!chain.headValid) continue;
        if (chain.readableCount > 0) chain.readable(0).fill(0xcc);
        q.pushUsed(chain.head, 0);
      }
      void mem;
    },
  };
  assert.throws(() => fuzzVirtqueues(1, 200, [careless]), /outside every writable descriptor/);
});
