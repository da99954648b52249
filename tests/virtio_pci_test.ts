import assert from "node:assert/strict";
import { GuestMemory } from "../vmm/memory.ts";
import { PciBus } from "../devices/pci/bus.ts";
import { type Activation, NOTIFY_OFFSET, VirtioPciDevice } from "../devices/virtio/pci_transport.ts";
import { blkConfigSpace, BlkDevice, blkFeatures, MemoryDisk } from "../devices/virtio/blk.ts";
import { SplitQueue } from "../devices/virtio/queue.ts";
import {
  BLK_S,
  BLK_T,
  F,
  featureBit,
  STATUS,
  VIRTIO_ID,
  VIRTIO_MSI_NO_VECTOR,
  VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_WRITE as W,
} from "../devices/virtio/constants.ts";
import { FakeDriverQueue } from "./virtio_driver.ts";

const windows = {
  mmio32: { base: 0xc000_0000, size: 0x1000_0000 },
  mmio64: { base: 2 ** 36, size: 2 ** 36 },
};

function blkDevice(disk = new MemoryDisk(1 << 20)) {
  return new VirtioPciDevice({
    type: VIRTIO_ID.BLOCK,
    features: blkFeatures(disk, { numQueues: 2 }),
    numQueues: 2,
    maxQueueSize: 256,
    config: blkConfigSpace(disk, { numQueues: 2 }),
  });
}

/** Minimal guest driver: MMIO accessors on BAR 0 and config accessors through ECAM. */
class Driver {
  constructor(readonly bus: PciBus, readonly dev: VirtioPciDevice, readonly slot: number) {}
  cfg(reg: number, size = 4): number {
    return this.bus.configRead(0, this.slot, 0, reg, size);
  }
  setCfg(reg: number, size: number, v: number): void {
    this.bus.configWrite(0, this.slot, 0, reg, size, v);
  }
  rd(off: number, size: number): number {
    const d = new Uint8Array(size);
    this.dev.mmioRead(off, d);
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + d[i];
    return v;
  }
  wr(off: number, size: number, v: number): void {
    const d = new Uint8Array(size);
    for (let i = 0; i < size; i++) d[i] = Math.floor(v / 2 ** (8 * i)) & 0xff;
    this.dev.mmioWrite(off, d);
  }
  /** Walks the capability list: virtio caps by cfg_type, plus MSI-X. */
  caps(): { virtio: Map<number, { bar: number; offset: number; length: number; at: number }>; msix: number } {
    const virtio = new Map();
    let msix = -1;
    assert.ok(this.cfg(6, 2) & 0x10);
    for (let p = this.cfg(0x34, 1), n = 0; p !== 0 && n < 48; p = this.cfg(p + 1, 1), n++) {
      const id = this.cfg(p, 1);
      if (id === 0x11) msix = p;
      if (id === 0x09) {
        const type = this.cfg(p + 3, 1);
        if (!virtio.has(type)) {
          virtio.set(type, {
            bar: this.cfg(p + 4, 1),
            offset: this.cfg(p + 8),
            length: this.cfg(p + 12),
            at: p,
          });
        }
      }
    }
    return { virtio, msix };
  }
}

Deno.test("virtio-pci: Linux-style driver init, activation, I/O, interrupts and reset", () => {
  const mem = GuestMemory.fromBuffers([{ gpa: 0, size: 0x100000 }]);
  const bus = new PciBus(windows);
  bus.add(0, PciBus.hostBridge(windows));
  const dev = blkDevice();
  const slot = bus.freeSlot();
  bus.add(slot, dev);
  const d = new Driver(bus, dev, slot);
  assert.equal(d.cfg(0), 0x1042_1af4);
  assert.equal(d.cfg(8, 1), 1); // revision 1: modern
  assert.equal(d.cfg(0x2c, 2), 0x1af4);
  const { virtio, msix } = d.caps();
  for (const t of [1, 2, 3, 4, 5]) assert.ok(virtio.has(t), `cap ${t}`);
  const common = virtio.get(1)!.offset;
  const notify = virtio.get(2)!;
  const mult = d.cfg(notify.at + 16);
  const isr = virtio.get(3)!.offset;
  const devcfg = virtio.get(4)!.offset;
  assert.equal(virtio.get(1)!.bar, 0);
  assert.ok(virtio.get(1)!.length >= 0x38);
  assert.ok(msix > 0);
  const nvec = (d.cfg(msix + 2, 2) & 0x7ff) + 1;
  assert.equal(nvec, 3);

  // BAR moves reach the lead
  const moves: number[] = [];
  bus.onBarChange = (_a, _f, bar, _o, n) => bar === 0 && moves.push(n);
  d.setCfg(4, 2, 0x6); // memory + bus master
  assert.deepEqual(moves, [2 ** 36]);
  assert.equal(dev.notifyAddress(1), 2 ** 36 + NOTIFY_OFFSET + 4);

  // reset, ACK, DRIVER
  d.wr(common + 0x14, 1, 0);
  assert.equal(d.rd(common + 0x14, 1), 0);
  d.wr(common + 0x14, 1, STATUS.ACKNOWLEDGE);
  d.wr(common + 0x14, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER);
  // features
  d.wr(common + 0x00, 4, 0);
  const lo = d.rd(common + 0x04, 4);
  d.wr(common + 0x00, 4, 1);
  const hi = d.rd(common + 0x04, 4);
  const offered = (BigInt(hi) << 32n) | BigInt(lo);
  assert.equal(offered, dev.features);
  const want = offered &
    (featureBit(F.VERSION_1) | featureBit(F.EVENT_IDX) | featureBit(F.INDIRECT_DESC) | 1n << 9n);
  d.wr(common + 0x08, 4, 0);
  d.wr(common + 0x0c, 4, Number(want & 0xffffffffn));
  d.wr(common + 0x08, 4, 1);
  d.wr(common + 0x0c, 4, Number(want >> 32n));
  d.wr(common + 0x14, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.FEATURES_OK);
  assert.ok(d.rd(common + 0x14, 1) & STATUS.FEATURES_OK);
  // feature writes after FEATURES_OK are ignored
  d.wr(common + 0x08, 4, 0);
  d.wr(common + 0x0c, 4, 0);
  assert.equal(dev.driverFeatures, want);

  // MSI-X: enable + mask, program vectors, unmask
  const vectors: Map<number, number> = new Map();
  dev.msix.onVectorChange = (v, e) => vectors.set(v, e.masked ? -1 : e.data);
  d.setCfg(msix + 2, 2, 0xc000);
  const tbl = d.cfg(msix + 4) & ~7;
  for (let v = 0; v < nvec; v++) {
    d.wr(tbl + 16 * v, 4, 0xfee0_0000);
    d.wr(tbl + 16 * v + 4, 4, 0);
    d.wr(tbl + 16 * v + 8, 4, 0x30 + v);
    d.wr(tbl + 16 * v + 12, 4, 0);
  }
  d.setCfg(msix + 2, 2, 0x8000);
  assert.deepEqual([...vectors.entries()], [[0, 0x30], [1, 0x31], [2, 0x32]]);
  d.wr(common + 0x10, 2, 0);
  assert.equal(d.rd(common + 0x10, 2), 0);
  d.wr(common + 0x10, 2, 7); // beyond the table
  assert.equal(d.rd(common + 0x10, 2), VIRTIO_MSI_NO_VECTOR);
  d.wr(common + 0x10, 2, 0);

  // queues
  assert.equal(d.rd(common + 0x12, 2), 2);
  const drvQueues: FakeDriverQueue[] = [];
  for (let q = 0; q < 2; q++) {
    d.wr(common + 0x16, 2, q);
    assert.equal(d.rd(common + 0x18, 2), 256);
    assert.equal(d.rd(common + 0x1c, 2), 0);
    const off = d.rd(common + 0x1e, 2);
    assert.equal(notify.offset + off * mult, NOTIFY_OFFSET + 4 * q);
    const fq = new FakeDriverQueue(mem, 0x10000 + q * 0x8000, 64);
    drvQueues.push(fq);
    d.wr(common + 0x18, 2, 64);
    d.wr(common + 0x1a, 2, q + 1);
    assert.equal(d.rd(common + 0x1a, 2), q + 1);
    d.wr(common + 0x20, 4, fq.descAddr); // two-part 64-bit writes
    d.wr(common + 0x24, 4, 0);
    d.wr(common + 0x28, 8, fq.driverAddr);
    d.wr(common + 0x30, 4, fq.deviceAddr);
    d.wr(common + 0x34, 4, 0);
    d.wr(common + 0x1c, 2, 1);
    assert.equal(d.rd(common + 0x1c, 2), 1);
    d.wr(common + 0x18, 2, 32); // ignored once enabled
    assert.equal(d.rd(common + 0x18, 2), 64);
  }
  d.wr(common + 0x16, 2, 5);
  assert.equal(d.rd(common + 0x18, 2), 0); // no such queue

  // device config
  assert.equal(d.rd(devcfg, 4), 2048); // capacity in sectors (low half)
  assert.equal(d.rd(devcfg + 34, 2), 2);

  let act: Activation | null = null;
  dev.onActivate = (a) => act = a;
  d.wr(common + 0x14, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.FEATURES_OK | STATUS.DRIVER_OK);
  assert.ok(act);
  const a = act as Activation;
  assert.equal(a.features, want);
  assert.equal(a.eventIdx, true);
  assert.equal(a.queues.length, 2);
  assert.deepEqual(a.queues[1], {
    index: 1,
    size: 64,
    descAddr: drvQueues[1].descAddr,
    driverAddr: drvQueues[1].driverAddr,
    deviceAddr: drvQueues[1].deviceAddr,
    msixVector: 2,
    notifyOffset: NOTIFY_OFFSET + 4,
  });

  // the device worker side: a T_IN request on queue 1
  const disk = new MemoryDisk(1 << 20);
  disk.data.fill(0x77, 512, 1024);
  const blk = new BlkDevice(disk);
  const q1 = new SplitQueue(mem, a.queues[1], { eventIdx: a.eventIdx, indirect: a.indirect });
  const fq = drvQueues[1];
  mem.writeU32(0x40000, BLK_T.IN);
  mem.writeU64(0x40008, 1);
  fq.setDesc(0, 0x40000, 16, NEXT, 1);
  fq.setDesc(1, 0x41000, 512, W | NEXT, 2);
  fq.setDesc(2, 0x42000, 1, W);
  fq.publish(0);
  let notified = -1;
  dev.onNotify = (q) => notified = q;
  d.wr(NOTIFY_OFFSET + 4, 2, 1);
  assert.equal(notified, 1);
  assert.equal(blk.processQueue(q1), true);
  assert.equal(mem.readU8(0x42000), BLK_S.OK);
  assert.equal(mem.readU8(0x41000), 0x77);
  assert.equal(dev.queueInterrupt(1), 2); // signal vector 2's irqfd
  // masked vector: pending, delivered on unmask
  const delivered: number[] = [];
  dev.msix.onDeliverPending = (v) => delivered.push(v);
  d.wr(tbl + 16 * 2 + 12, 4, 1);
  assert.equal(dev.queueInterrupt(1), -1);
  d.wr(tbl + 16 * 2 + 12, 4, 0);
  assert.deepEqual(delivered, [2]);
  // ISR read clears
  assert.equal(d.rd(isr, 1) & 1, 1);
  assert.equal(d.rd(isr, 1), 0);
  // needs-reset + config interrupt on vector 0
  dev.setNeedsReset();
  assert.ok(d.rd(common + 0x14, 1) & STATUS.DEVICE_NEEDS_RESET);
  assert.equal(dev.configInterrupt(), 0);

  // reset
  let resets = 0;
  dev.onReset = () => resets++;
  d.wr(common + 0x14, 1, 0);
  assert.equal(resets, 1);
  assert.equal(d.rd(common + 0x14, 1), 0);
  d.wr(common + 0x16, 2, 1);
  assert.equal(d.rd(common + 0x1c, 2), 0);
  assert.equal(d.rd(common + 0x18, 2), 256);
  assert.equal(d.rd(common + 0x1a, 2), VIRTIO_MSI_NO_VECTOR);
  assert.equal(dev.driverFeatures, 0n);
});

Deno.test("virtio-pci: feature negotiation failures", () => {
  const dev = blkDevice();
  const d = new Driver(new PciBus(windows), dev, 0);
  const tryFeatures = (f: bigint) => {
    d.wr(0x14, 1, 0);
    d.wr(0x14, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER);
    d.wr(0x08, 4, 0);
    d.wr(0x0c, 4, Number(f & 0xffffffffn));
    d.wr(0x08, 4, 1);
    d.wr(0x0c, 4, Number(f >> 32n));
    d.wr(0x14, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.FEATURES_OK);
    return (d.rd(0x14, 1) & STATUS.FEATURES_OK) !== 0;
  };
  const v1 = featureBit(F.VERSION_1);
  assert.equal(tryFeatures(v1), true);
  assert.equal(tryFeatures(0n), false); // VERSION_1 required
  assert.equal(tryFeatures(v1 | featureBit(F.RING_PACKED)), false); // not offered
  assert.equal(tryFeatures(v1 | 1n << 5n), false); // RO not offered on a writable disk
  // DRIVER_OK without FEATURES_OK does not activate
  let activated = false;
  dev.onActivate = () => activated = true;
  d.wr(0x14, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.DRIVER_OK);
  assert.equal(activated, false);
  // bad queue configuration is refused at enable time
  assert.equal(tryFeatures(v1), true);
  d.wr(0x16, 2, 0);
  d.wr(0x18, 2, 48); // not a power of two
  d.wr(0x1c, 2, 1);
  assert.equal(d.rd(0x1c, 2), 0);
  d.wr(0x18, 2, 16);
  d.wr(0x20, 4, 0x1008); // misaligned descriptor table
  d.wr(0x1c, 2, 1);
  assert.equal(d.rd(0x1c, 2), 0);
  d.wr(0x20, 4, 0x1000);
  d.wr(0x1c, 2, 1);
  assert.equal(d.rd(0x1c, 2), 1);
  d.wr(0x14, 1, STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.FEATURES_OK | STATUS.DRIVER_OK);
  assert.equal(activated, true);
  assert.equal(dev.activation().queues.length, 1);
});

Deno.test("virtio-pci: PCI_CFG access window and shared state", () => {
  const dev = blkDevice();
  const bus = new PciBus(windows);
  bus.add(1, dev);
  const d = new Driver(bus, dev, 1);
  const cap = d.caps().virtio.get(5)!.at;
  // read the common config num_queues through the window
  d.setCfg(cap + 4, 1, 0);
  d.setCfg(cap + 8, 4, 0x12);
  d.setCfg(cap + 12, 4, 2);
  assert.equal(d.cfg(cap + 16, 2), 2);
  // write device_status through the window
  d.setCfg(cap + 8, 4, 0x14);
  d.setCfg(cap + 12, 4, 1);
  d.setCfg(cap + 16, 1, STATUS.ACKNOWLEDGE);
  assert.equal(dev.status, STATUS.ACKNOWLEDGE);
  // a second instance over the same shared state (another vCPU worker) sees the same device
  const other = new VirtioPciDevice(dev.spec, dev.shared);
  assert.equal(other.status, STATUS.ACKNOWLEDGE);
  assert.equal(other.config.read(0, 4), 0x1042_1af4);
  assert.equal(other.config.barAddress(0), dev.config.barAddress(0));
  assert.equal(other.msix.capOffset, dev.msix.capOffset);
  const c = structuredClone(dev.shared);
  assert.ok(c.virtio instanceof SharedArrayBuffer);
});
