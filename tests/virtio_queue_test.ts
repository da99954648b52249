import assert from "node:assert/strict";
import { GuestMemory } from "../vmm/memory.ts";
import { ChainError, needEvent, QueueConfigError, SplitQueue } from "../devices/virtio/queue.ts";
import {
  VIRTQ_DESC_F_INDIRECT as IND,
  VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_WRITE as W,
} from "../devices/virtio/constants.ts";
import { FakeDriverQueue } from "./virtio_driver.ts";

function setup(size = 8, opts: { eventIdx?: boolean; indirect?: boolean; maxIndirect?: number } = {}) {
  const mem = GuestMemory.fromBuffers([{ gpa: 0, size: 0x10000 }, { gpa: 0x100000, size: 0x10000 }]);
  const drv = new FakeDriverQueue(mem, 0x1000, size);
  const q = new SplitQueue(mem, drv.config, opts);
  return { mem, drv, q };
}

Deno.test("queue: normal chain, readable then writable, zero-copy views", () => {
  const { mem, drv, q } = setup();
  mem.write(0x4000, new Uint8Array([1, 2, 3, 4]));
  drv.setDesc(0, 0x4000, 4, NEXT, 3);
  drv.setDesc(3, 0x5000, 16, W | NEXT, 5);
  drv.setDesc(5, 0x6000, 1, W);
  assert.equal(q.popChain(), null);
  drv.publish(0);
  const c = q.popChain()!;
  assert.equal(c.error, null);
  assert.equal(c.head, 0);
  assert.equal(c.descriptorCount, 3);
  assert.equal(c.readableCount, 1);
  assert.equal(c.writableCount, 2);
  assert.equal(c.readableBytes, 4);
  assert.equal(c.writableBytes, 17);
  assert.deepEqual([...c.readable(0)], [1, 2, 3, 4]);
  assert.equal(c.writableGpa(1), 0x6000);
  c.writable(0)[0] = 0xaa;
  assert.equal(mem.readU8(0x5000), 0xaa);
  assert.equal(c.writeAt(15, new Uint8Array([7, 8])), 2);
  assert.equal(mem.readU8(0x500f), 7);
  assert.equal(mem.readU8(0x6000), 8);
  const dst = new Uint8Array(3);
  assert.equal(c.readAt(1, dst), 3);
  assert.deepEqual([...dst], [2, 3, 4]);
  assert.equal(q.popChain(), null);
});

Deno.test("queue: reused chain object, ring wrap-around of indices", () => {
  const { drv, q } = setup(4);
  drv.setDesc(0, 0x4000, 8, W);
  let prev = null;
  for (let i = 0; i < 70000; i++) {
    drv.publish(0);
    const c = q.popChain()!;
    assert.equal(c.error, null);
    if (prev) assert.equal(c, prev);
    prev = c;
    q.pushUsed(c.head, 8);
  }
  assert.equal(q.lastAvailIdx, 70000 & 0xffff);
  assert.equal(drv.usedIdx(), 70000 & 0xffff);
  assert.deepEqual(drv.used(69999), { id: 0, len: 8 });
});

Deno.test("queue: hostile heads, next indices, loops", () => {
  const { drv, q } = setup(8);
  drv.publish(8); // head out of range
  let c = q.popChain()!;
  assert.equal(c.error, ChainError.HEAD_OUT_OF_RANGE);
  assert.equal(c.headValid, false);
  drv.setDesc(1, 0x4000, 4, NEXT, 200);
  drv.publish(1);
  c = q.popChain()!;
  assert.equal(c.error, ChainError.NEXT_OUT_OF_RANGE);
  assert.equal(c.headValid, true);
  drv.setDesc(2, 0x4000, 4, NEXT, 3);
  drv.setDesc(3, 0x4000, 4, NEXT, 2); // 2 -> 3 -> 2 ...
  drv.publish(2);
  assert.equal(q.popChain()!.error, ChainError.TOO_LONG);
  drv.setDesc(4, 0x4000, 4, NEXT, 4); // self loop
  drv.publish(4);
  assert.equal(q.popChain()!.error, ChainError.TOO_LONG);
  // a chain using every descriptor exactly once is fine
  for (let i = 0; i < 8; i++) drv.setDesc(i, 0x4000 + i * 16, 16, i < 7 ? NEXT : 0, i + 1);
  drv.publish(0);
  c = q.popChain()!;
  assert.equal(c.error, null);
  assert.equal(c.readableCount, 8);
});

Deno.test("queue: out-of-range and overflowing addresses, region boundaries", () => {
  const { drv, q, mem } = setup(8);
  const bad: [number, number][] = [
    [0x20000, 4], // hole
    [0xfffc, 8], // crosses end of region 0 into a hole
    [2 ** 53 - 2, 4],
    [0x10ffff, 2], // crosses end of region 1
  ];
  for (const [a, l] of bad) {
    drv.setDesc(0, a, l, W);
    drv.publish(0);
    assert.equal(q.popChain()!.error, ChainError.BAD_ADDRESS, `addr ${a}`);
  }
  // high dword above 2^53
  mem.writeU64(drv.descAddr, 0xffff_ffff_ffff_f000n);
  mem.writeU32(drv.descAddr + 8, 16);
  drv.publish(0);
  assert.equal(q.popChain()!.error, ChainError.BAD_ADDRESS);
  // the last byte of a region is fine
  drv.setDesc(0, 0x10ffff, 1, W);
  drv.publish(0);
  const c = q.popChain()!;
  assert.equal(c.error, null);
  assert.equal(c.writableGpa(0), 0x10ffff);
});

Deno.test("queue: buffer spanning two adjacent regions is split", () => {
  const mem = GuestMemory.fromBuffers([{ gpa: 0, size: 0x10000 }, { gpa: 0x10000, size: 0x10000 }]);
  const drv = new FakeDriverQueue(mem, 0x1000, 4);
  const q = new SplitQueue(mem, drv.config);
  drv.setDesc(0, 0xfff0, 0x20, W);
  drv.publish(0);
  const c = q.popChain()!;
  assert.equal(c.error, null);
  assert.equal(c.writableCount, 2);
  assert.equal(c.writableBytes, 0x20);
  assert.equal(c.writableGpa(1), 0x10000);
  assert.equal(c.writeAt(0, new Uint8Array(0x20).fill(5)), 0x20);
  assert.equal(mem.readU8(0x1000f), 5);
});

Deno.test("queue: zero-length descriptors are accepted and skipped", () => {
  const { drv, q } = setup(8);
  drv.setDesc(0, 0xdead_beef_000, 0, NEXT, 1); // address irrelevant when len is 0
  drv.setDesc(1, 0x4000, 4, W);
  drv.publish(0);
  const c = q.popChain()!;
  assert.equal(c.error, null);
  assert.equal(c.descriptorCount, 2);
  assert.equal(c.readableCount, 0);
  assert.equal(c.writableCount, 1);
});

Deno.test("queue: readable after writable is rejected", () => {
  const { drv, q } = setup(8);
  drv.setDesc(0, 0x4000, 4, W | NEXT, 1);
  drv.setDesc(1, 0x5000, 4, 0);
  drv.publish(0);
  assert.equal(q.popChain()!.error, ChainError.ORDER);
});

Deno.test("queue: chain over 4 GiB total is rejected", () => {
  const mem = GuestMemory.fromBuffers([{ gpa: 0, size: 0x10000 }]);
  const drv = new FakeDriverQueue(mem, 0x1000, 4);
  const q = new SplitQueue(mem, drv.config);
  // lengths are checked for the total before the addresses
  drv.setDesc(0, 0x4000, 0xffff_ffff, NEXT, 1);
  drv.setDesc(1, 0x4000, 2, 0);
  drv.publish(0);
  assert.notEqual(q.popChain()!.error, null);
});

Deno.test("queue: avail idx jump larger than queue size breaks the queue", () => {
  const { drv, q } = setup(8);
  drv.setAvailIdx(9);
  let c = q.popChain()!;
  assert.equal(c.error, ChainError.AVAIL_IDX_JUMP);
  assert.equal(c.headValid, false);
  assert.equal(q.broken, ChainError.AVAIL_IDX_JUMP);
  drv.setAvailIdx(1);
  c = q.popChain()!;
  assert.equal(c.error, ChainError.AVAIL_IDX_JUMP); // sticky until reset
  // exactly size is fine
  const s = setup(8);
  s.drv.setDesc(0, 0x4000, 4);
  s.drv.setAvailIdx(8);
  for (let i = 0; i < 8; i++) assert.equal(s.q.popChain()!.error, null);
  assert.equal(s.q.popChain(), null);
});

Deno.test("queue: indirect descriptors", () => {
  const { drv, q, mem } = setup(8, { indirect: true });
  const t = 0x8000;
  drv.setIndirect(t, 0, 0x4000, 16, NEXT, 2);
  drv.setIndirect(t, 2, 0x5000, 512, W | NEXT, 1);
  drv.setIndirect(t, 1, 0x6000, 1, W);
  drv.setDesc(0, 0x3000, 8, NEXT, 1); // normal descriptor before the indirect one
  drv.setDesc(1, t, 48, IND | W); // WRITE on the indirect descriptor is ignored
  drv.publish(0);
  const c = q.popChain()!;
  assert.equal(c.error, null);
  assert.equal(c.readableCount, 2);
  assert.equal(c.writableCount, 2);
  assert.equal(c.readableGpa(1), 0x4000);
  assert.equal(c.writableGpa(0), 0x5000);
  assert.equal(c.writableGpa(1), 0x6000);
  assert.equal(c.descriptorCount, 5);
  void mem;
});

Deno.test("queue: indirect abuse", () => {
  const { drv, q, mem } = setup(8, { indirect: true, maxIndirect: 64 });
  const t = 0x8000;
  const cases: [() => void, string][] = [
    [() => drv.setDesc(0, t, 24, IND), ChainError.INDIRECT_LEN],
    [() => drv.setDesc(0, t, 0, IND), ChainError.INDIRECT_LEN],
    [() => drv.setDesc(0, t, 16 * 65, IND), ChainError.INDIRECT_TOO_LONG],
    [() => drv.setDesc(0, 0xfff0, 32, IND), ChainError.INDIRECT_BAD_ADDRESS],
    [() => drv.setDesc(0, 0x50000, 32, IND), ChainError.INDIRECT_BAD_ADDRESS],
    [() => drv.setDesc(0, t, 32, IND | NEXT, 1), ChainError.INDIRECT_WITH_NEXT],
    [() => {
      drv.setDesc(0, t, 32, IND);
      drv.setIndirect(t, 0, t, 32, IND);
    }, ChainError.INDIRECT_NESTED],
    [() => {
      drv.setDesc(0, t, 32, IND);
      drv.setIndirect(t, 0, 0x4000, 4, NEXT, 1);
      drv.setIndirect(t, 1, 0x4000, 4, NEXT, 0);
    }, ChainError.TOO_LONG],
    [() => {
      drv.setDesc(0, t, 32, IND);
      drv.setIndirect(t, 0, 0x4000, 4, NEXT, 2);
    }, ChainError.NEXT_OUT_OF_RANGE],
    [() => {
      drv.setDesc(0, t, 32, IND);
      drv.setIndirect(t, 0, 0x4000, 4, W | NEXT, 1);
      drv.setIndirect(t, 1, 0x4000, 4, 0);
    }, ChainError.ORDER],
    [() => {
      drv.setDesc(0, 0x4000, 4, W | NEXT, 1);
      drv.setDesc(1, t, 16, IND);
      drv.setIndirect(t, 0, 0x4000, 4, 0);
    }, ChainError.ORDER],
    [() => {
      drv.setDesc(0, t, 16, IND);
      drv.setIndirect(t, 0, 0x30000, 4, 0);
    }, ChainError.BAD_ADDRESS],
  ];
  for (const [prep, err] of cases) {
    mem.fill(t, 0x100, 0);
    prep();
    drv.publish(0);
    assert.equal(q.popChain()!.error, err);
  }
  const plain = setup(8, { indirect: false });
  plain.drv.setDesc(0, t, 16, IND);
  plain.drv.publish(0);
  assert.equal(plain.q.popChain()!.error, ChainError.INDIRECT_NOT_NEGOTIATED);
});

Deno.test("queue: bad configuration is a QueueConfigError", () => {
  const mem = GuestMemory.fromBuffers([{ gpa: 0, size: 0x10000 }]);
  const ok = { size: 8, descAddr: 0x1000, driverAddr: 0x2000, deviceAddr: 0x3000 };
  for (
    const bad of [
      { ...ok, size: 0 },
      { ...ok, size: 6 },
      { ...ok, size: 65536 },
      { ...ok, descAddr: 0x1008 },
      { ...ok, driverAddr: 0x2001 },
      { ...ok, deviceAddr: 0x3002 },
      { ...ok, deviceAddr: 0xfff0 },
      { ...ok, descAddr: 0x20000 },
    ]
  ) {
    assert.throws(() => new SplitQueue(mem, bad), QueueConfigError);
  }
  new SplitQueue(mem, ok);
});

Deno.test("queue: needEvent math", () => {
  assert.equal(needEvent(0, 1, 0), true);
  assert.equal(needEvent(1, 1, 0), false);
  // the driver wants an interrupt once the used entry with index `event` is written: event in [old, new)
  assert.equal(needEvent(4, 6, 3), true);
  assert.equal(needEvent(6, 6, 3), false);
  assert.equal(needEvent(3, 6, 3), true);
  assert.equal(needEvent(2, 6, 3), false);
  assert.equal(needEvent(0xffff, 2, 0xfffe), true); // wrap
  assert.equal(needEvent(1, 2, 0xfffe), true);
  assert.equal(needEvent(2, 2, 0xfffe), false);
});

Deno.test("queue: interrupts without event idx honour NO_INTERRUPT", () => {
  const { drv, q } = setup(8);
  drv.setDesc(0, 0x4000, 4, W);
  assert.equal(q.needsInterrupt(), false); // nothing used yet
  drv.publish(0);
  q.pushUsed(q.popChain()!.head, 4);
  assert.equal(q.needsInterrupt(), true);
  assert.equal(q.needsInterrupt(), false);
  drv.setAvailFlags(1);
  drv.publish(0);
  q.pushUsed(q.popChain()!.head, 4);
  assert.equal(q.needsInterrupt(), false);
  // notification suppression via used.flags
  q.disableNotification();
  assert.equal(drv.usedFlags(), 1);
  assert.equal(q.enableNotification(), false);
  assert.equal(drv.usedFlags(), 0);
  drv.publish(0);
  q.disableNotification();
  assert.equal(q.enableNotification(), true); // arrived while disabled
});

Deno.test("queue: event idx interrupts and avail_event", () => {
  const { drv, q } = setup(8, { eventIdx: true });
  drv.setDesc(0, 0x4000, 4, W);
  drv.setUsedEvent(2); // interrupt me once used idx passes 2
  for (let i = 0; i < 2; i++) {
    drv.publish(0);
    q.pushUsed(q.popChain()!.head, 4);
    assert.equal(q.needsInterrupt(), false, `used ${i + 1}`);
  }
  assert.equal(drv.availEvent(), 2); // updated on pop
  drv.publish(0);
  drv.publish(0);
  q.pushUsed(q.popChain()!.head, 4);
  q.pushUsed(q.popChain()!.head, 4);
  assert.equal(q.needsInterrupt(), true); // used went 2 -> 4, event 2 crossed
  drv.setUsedEvent(4);
  assert.equal(q.needsInterrupt(), false);
  // disabling stops avail_event updates, enabling publishes the current position
  q.disableNotification();
  drv.publish(0);
  q.popChain();
  assert.equal(drv.availEvent(), 4);
  assert.equal(q.enableNotification(), false);
  assert.equal(drv.availEvent(), 5);
  // AVAIL_F_NO_INTERRUPT is ignored with event idx
  drv.setAvailFlags(1);
  drv.setUsedEvent(4);
  q.pushUsed(0, 4);
  assert.equal(q.needsInterrupt(), true);
});

Deno.test("queue: restored indices", () => {
  const mem = GuestMemory.fromBuffers([{ gpa: 0, size: 0x10000 }]);
  const drv = new FakeDriverQueue(mem, 0x1000, 4);
  drv.setDesc(2, 0x4000, 4);
  drv.setAvailIdx(0xfffe);
  const q = new SplitQueue(mem, drv.config, { lastAvailIdx: 0xfffe, nextUsedIdx: 0xfffe });
  assert.equal(q.popChain(), null);
  drv.publish(2);
  drv.publish(2);
  assert.equal(q.availableCount(), 2);
  q.pushUsed(q.popChain()!.head, 1);
  q.pushUsed(q.popChain()!.head, 1);
  assert.equal(drv.usedIdx(), 0);
  assert.deepEqual(drv.used(0xffff), { id: 2, len: 1 });
});
