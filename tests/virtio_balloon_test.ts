/**
 * virtio-balloon: features, config space (target / actual, driver writes), inflate / deflate / free
 * page reporting with hostile chains, the main-thread control, and real page release (madvise).
 */
import assert from "node:assert/strict";
import { GuestMemory } from "../vmm/memory.ts";
import { SplitQueue } from "../devices/virtio/queue.ts";
import {
  BALLOON_CONFIG_SIZE,
  BALLOON_F_DEFLATE_ON_OOM,
  BALLOON_F_REPORTING,
  BALLOON_PAGE,
  balloonConfigSpace,
  balloonConfigWrite,
  BalloonControl,
  BalloonDevice,
  balloonFeatures,
  balloonPages,
  balloonQueues,
  DEFLATE_QUEUE,
  hostMemoryReleaser,
  INFLATE_QUEUE,
  MAX_PFN_BYTES,
  type MemoryReleaser,
  REPORTING_QUEUE,
} from "../devices/virtio/balloon.ts";
import { DEVICE_CFG_OFFSET, ISR_OFFSET, VirtioPciDevice } from "../devices/virtio/pci_transport.ts";
import {
  F,
  featureBit,
  VIRTIO_ID,
  VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_WRITE as W,
} from "../devices/virtio/constants.ts";
import {
  newControlBlock,
  type VirtioDeviceDescriptor,
  VirtioDeviceHandle,
} from "../devices/virtio/device_shared.ts";
import { FakeDriverQueue } from "./virtio_driver.ts";
import { mapAnonymous, mapMemfd, mappingBytes, unmap } from "../ffi/kvm.ts";

const P = BALLOON_PAGE;
const PFNS = 0x3000;

/** Guest RAM: [0, 1 MiB) and [1 MiB, 1.25 MiB) adjacent (two regions), then a hole, then [4 MiB, 4.5 MiB). */
function setup(fail = false) {
  const mem = GuestMemory.fromBuffers([
    { gpa: 0, size: 0x10_0000 },
    { gpa: 0x10_0000, size: 0x4_0000 },
    { gpa: 0x40_0000, size: 0x8_0000 },
  ]);
  const released: [number, number][] = [];
  const releaser: MemoryReleaser = {
    release(gpa, len) {
      released.push([gpa, len]);
      return !fail;
    },
  };
  const dev = new BalloonDevice(releaser, mem);
  const queues = [0x1000, 0x2000, 0x2800].map((base) => {
    const drv = new FakeDriverQueue(mem, base, 16);
    return { drv, q: new SplitQueue(mem, drv.config, {}) };
  });
  /** Publishes chain 0 on queue i and serves it; returns the used length. */
  const run = (i: number) => {
    const { drv, q } = queues[i];
    const before = drv.usedIdx();
    drv.publish(0);
    assert.equal(dev.service(q, i), true);
    assert.equal(drv.usedIdx(), (before + 1) & 0xffff);
    return drv.used(before).len;
  };
  /** Writes PFNs at PFNS and sends them as one descriptor on queue i. */
  const pfns = (i: number, list: number[]) => {
    list.forEach((pfn, k) => mem.writeU32(PFNS + 4 * k, pfn >>> 0));
    queues[i].drv.setDesc(0, PFNS, 4 * list.length);
    return run(i);
  };
  return { mem, dev, queues, released, run, pfns, c: () => dev.counters.snapshot() };
}

Deno.test("balloon: features, queues and config space as Cloud Hypervisor offers them", () => {
  assert.equal(VIRTIO_ID.BALLOON, 5);
  assert.equal(balloonFeatures(), featureBit(F.VERSION_1));
  const all = balloonFeatures({ deflateOnOom: true, freePageReporting: true });
  assert.equal(
    all,
    featureBit(F.VERSION_1) | featureBit(BALLOON_F_DEFLATE_ON_OOM) | featureBit(BALLOON_F_REPORTING),
  );
  assert.equal(balloonQueues(), 2);
  assert.equal(balloonQueues({ freePageReporting: true }), 3);
  const c = new DataView(balloonConfigSpace(128 << 20).buffer);
  assert.equal(c.byteLength, BALLOON_CONFIG_SIZE);
  assert.equal(c.getUint32(0, true), 32768);
  assert.equal(c.getUint32(4, true), 0);
  assert.equal(balloonPages(P - 1), 0);
  assert.equal(balloonPages(3 * P + 5), 3);
});

Deno.test("balloon: inflate releases the frames in runs of adjacent pages inside one RAM region", () => {
  const s = setup();
  // 0x10..0x12 adjacent; 0x20 alone; 0xff and 0x100 are adjacent but in two regions; 0x400 in the third.
  assert.equal(s.pfns(INFLATE_QUEUE, [0x10, 0x11, 0x12, 0x20, 0xff, 0x100, 0x101, 0x400]), 0);
  assert.deepEqual(s.released, [
    [0x10 * P, 3 * P],
    [0x20 * P, P],
    [0xff * P, P],
    [0x100 * P, 2 * P],
    [0x400 * P, P],
  ]);
  assert.equal(s.c().inflated_bytes, 8 * P);
  assert.equal(s.c().bad_requests, 0);
});

Deno.test("balloon: deflate only accounts; PFNs outside RAM are skipped and counted", () => {
  const s = setup();
  assert.equal(s.pfns(DEFLATE_QUEUE, [0x10, 0x11]), 0);
  assert.deepEqual(s.released, []);
  assert.equal(s.c().deflated_bytes, 2 * P);
  // 0x140 is the first frame of the hole; 0x480 just past the end; 0xffffffff at 16 TiB.
  s.pfns(INFLATE_QUEUE, [0x140, 0x13f, 0x480, 0xffffffff, 0x47f]);
  assert.deepEqual(s.released, [[0x13f * P, P], [0x47f * P, P]]);
  assert.equal(s.c().inflated_bytes, 2 * P);
  assert.equal(s.c().bad_requests, 1);
});

Deno.test("balloon: a PFN array may be split over descriptors, even mid-entry", () => {
  const s = setup();
  [0x30, 0x31, 0x50].forEach((pfn, k) => s.mem.writeU32(PFNS + 4 * k, pfn));
  const { drv } = s.queues[INFLATE_QUEUE];
  drv.setDesc(0, PFNS, 6, NEXT, 1);
  drv.setDesc(1, PFNS + 6, 6);
  assert.equal(s.run(INFLATE_QUEUE), 0);
  assert.deepEqual(s.released, [[0x30 * P, 2 * P], [0x50 * P, P]]);
});

Deno.test("balloon: hostile inflate chains are completed and touch nothing", async (t) => {
  const cases: [string, (s: ReturnType<typeof setup>) => void][] = [
    ["length not a multiple of 4", (s) => s.queues[0].drv.setDesc(0, PFNS, 6)],
    ["more than MAX_PFN_BYTES", (s) => s.queues[0].drv.setDesc(0, 0, MAX_PFN_BYTES + 4)],
    ["PFN array outside guest RAM", (s) => s.queues[0].drv.setDesc(0, 0x20_0000, 8)],
    ["PFN array crossing into the hole", (s) => s.queues[0].drv.setDesc(0, 0x14_0000 - 4, 8)],
    ["a descriptor loop", (s) => {
      s.queues[0].drv.setDesc(0, PFNS, 4, NEXT, 1);
      s.queues[0].drv.setDesc(1, PFNS, 4, NEXT, 0);
    }],
    ["readable after writable", (s) => {
      s.queues[0].drv.setDesc(0, PFNS, 4, NEXT | W, 1);
      s.queues[0].drv.setDesc(1, PFNS, 4);
    }],
  ];
  for (const [name, build] of cases) {
    await t.step(name, () => {
      const s = setup();
      s.mem.writeU32(PFNS, 0x10);
      s.mem.writeU32(PFNS + 4, 0x11);
      build(s);
      assert.equal(s.run(INFLATE_QUEUE), 0);
      assert.deepEqual(s.released, []);
      assert.equal(s.c().inflated_bytes, 0);
      assert.equal(s.c().bad_requests, 1);
    });
  }
  await t.step("device-writable buffers are ignored", () => {
    const s = setup();
    s.mem.writeU32(PFNS, 0x10);
    s.queues[0].drv.setDesc(0, PFNS, 4, W);
    assert.equal(s.run(INFLATE_QUEUE), 0);
    assert.deepEqual(s.released, []);
  });
  await t.step("an available index jump breaks the queue", () => {
    const s = setup();
    s.queues[0].drv.setAvailIdx(1000);
    s.dev.service(s.queues[0].q, INFLATE_QUEUE);
    assert.notEqual(s.queues[0].q.broken, null);
    assert.deepEqual(s.released, []);
  });
  await t.step("a queue index the device does not have", () => {
    const s = setup();
    s.queues[0].drv.setDesc(0, PFNS, 4);
    s.queues[0].drv.publish(0);
    s.dev.service(s.queues[0].q, 7);
    assert.deepEqual(s.released, []);
    assert.equal(s.c().bad_requests, 1);
  });
});

Deno.test("balloon: free page reporting releases the whole pages of every reported range", () => {
  const s = setup();
  const { drv } = s.queues[REPORTING_QUEUE];
  drv.setDesc(0, 0x8_0000, 0x4_0000, W | NEXT, 1); // 256 KiB, aligned
  drv.setDesc(1, 0x3_0010, 3 * P, W | NEXT, 2); // unaligned: only the two whole pages inside
  drv.setDesc(2, 0x5_0000, 100, W | NEXT, 3); // less than a page: nothing
  drv.setDesc(3, 0xf_f000, 2 * P, W); // crosses into the second region: one page in each
  assert.equal(s.run(REPORTING_QUEUE), 0);
  assert.deepEqual(s.released, [
    [0x8_0000, 0x4_0000],
    [0x3_1000, 2 * P],
    [0xf_f000, P],
    [0x10_0000, P],
  ]);
  assert.equal(s.c().reported_bytes, 0x4_0000 + 4 * P);

  const bad = setup();
  bad.queues[REPORTING_QUEUE].drv.setDesc(0, 0x12_0000, 0x4_0000, W); // runs into the hole
  assert.equal(bad.run(REPORTING_QUEUE), 0);
  assert.deepEqual(bad.released, []);
  assert.equal(bad.c().bad_requests, 1);
});

Deno.test("balloon: a failing release is counted, the request still completes", () => {
  const s = setup(true);
  s.pfns(INFLATE_QUEUE, [0x10, 0x30]);
  assert.equal(s.c().release_errors, 2);
  s.queues[REPORTING_QUEUE].drv.setDesc(0, 0x8_0000, P, W);
  assert.equal(s.run(REPORTING_QUEUE), 0);
  assert.equal(s.c().release_errors, 3);
  assert.equal(s.c().reported_bytes, 0);
});

function balloonTransport(target: number) {
  return new VirtioPciDevice({
    type: VIRTIO_ID.BALLOON,
    features: balloonFeatures(),
    numQueues: 2,
    maxQueueSize: 128,
    config: balloonConfigSpace(target),
  });
}

Deno.test("balloon: the driver may write `actual` (whole) and nothing else of the config space", () => {
  const t = balloonTransport(64 << 20);
  t.onConfigWrite = (off, data) => balloonConfigWrite(t, off, data);
  const read = (off: number) => {
    const b = new Uint8Array(4);
    t.mmioRead(DEVICE_CFG_OFFSET + off, b);
    return new DataView(b.buffer).getUint32(0, true);
  };
  const le = (v: number) => new Uint8Array(new Uint32Array([v]).buffer);
  t.mmioWrite(DEVICE_CFG_OFFSET + 0, le(1)); // num_pages: the host's
  t.mmioWrite(DEVICE_CFG_OFFSET + 4, le(1).subarray(0, 2)); // partial
  t.mmioWrite(DEVICE_CFG_OFFSET + 5, le(1).subarray(0, 1)); // misaligned
  t.mmioWrite(DEVICE_CFG_OFFSET + 8, le(1)); // beyond the config space
  assert.equal(read(0), 16384);
  assert.equal(read(4), 0);
  t.mmioWrite(DEVICE_CFG_OFFSET + 4, le(12345));
  assert.equal(read(4), 12345);
});

Deno.test("balloon: the main-thread control reads actual and target and sets the target", () => {
  const t = balloonTransport(128 << 20);
  const desc: VirtioDeviceDescriptor = {
    id: "__balloon",
    kind: "balloon",
    slot: 1,
    spec: t.spec,
    shared: t.shared,
    control: newControlBlock(),
    queueFds: [],
    irqFds: [],
    controlFd: -1,
    gsiBase: 24,
    balloon: { sharedMemory: false },
    counters: new SharedArrayBuffer(8 * 5),
  };
  const ctl = new BalloonControl(new VirtioDeviceHandle(desc, t));
  assert.equal(ctl.targetBytes(), 128 << 20);
  assert.equal(ctl.actualBytes(), 0);
  balloonConfigWrite(t, 4, new Uint8Array(new Uint32Array([1000]).buffer));
  assert.equal(ctl.actualBytes(), 1000 * P);
  const gen = new Uint8Array(1);
  t.mmioRead(0x15, gen);
  ctl.setTarget(64 << 20);
  assert.equal(ctl.targetBytes(), 64 << 20);
  const gen2 = new Uint8Array(1);
  t.mmioRead(0x15, gen2);
  assert.notEqual(gen2[0], gen[0], "config_generation moved");
  const isr = new Uint8Array(1);
  t.mmioRead(ISR_OFFSET, isr);
  assert.equal(isr[0] & 2, 2, "config change interrupt raised");
  assert.throws(() => ctl.setTarget(-1), RangeError);
  const c = ctl.counters();
  assert.equal(c.actual_bytes, 1000 * P);
  assert.equal(c.target_bytes, 64 << 20);
  assert.equal(c.inflated_bytes, 0);
});

Deno.test("balloon: released pages of private and memfd RAM read back as zeros; outside RAM is refused", () => {
  for (const shared of [false, true]) {
    const m = shared ? mapMemfd(1 << 20, "dvmm-balloon-test") : mapAnonymous(1 << 20);
    try {
      const mem = GuestMemory.fromHost([{ gpa: 0x10_0000, size: m.size, hostAddr: m.hostAddr }]);
      const bytes = mappingBytes(m);
      bytes.fill(0x5a);
      const r = hostMemoryReleaser(mem, shared);
      assert.equal(r.release(0x10_0000 + 4 * P, 2 * P), true);
      assert.ok(bytes.subarray(4 * P, 6 * P).every((b) => b === 0), `shared=${shared}`);
      assert.equal(bytes[4 * P - 1], 0x5a);
      assert.equal(bytes[6 * P], 0x5a);
      assert.equal(r.release(0, P), false);
      assert.equal(r.release(0x10_0000 + (1 << 20) - P, 2 * P), false);
    } finally {
      unmap(m);
    }
  }
});
