import assert from "node:assert/strict";
import { GuestMemory } from "../vmm/memory.ts";
import { SplitQueue } from "../devices/virtio/queue.ts";
import { cryptoSource, FileEntropySource, RngDevice } from "../devices/virtio/rng.ts";
import { VIRTQ_DESC_F_NEXT as NEXT, VIRTQ_DESC_F_WRITE as W } from "../devices/virtio/constants.ts";
import { FakeDriverQueue } from "./virtio_driver.ts";

for (
  const [name, mk] of [["crypto", () => cryptoSource], ["urandom", () => new FileEntropySource()]] as const
) {
  Deno.test(`rng: fills writable buffers (${name})`, () => {
    const mem = GuestMemory.fromBuffers([{ gpa: 0, size: 0x100000 }]);
    const drv = new FakeDriverQueue(mem, 0x1000, 8);
    const q = new SplitQueue(mem, drv.config);
    const src = mk();
    const dev = new RngDevice(src);
    drv.setDesc(0, 0x4000, 64, W | NEXT, 1);
    drv.setDesc(1, 0x10000, 100000, W);
    drv.publish(0);
    assert.equal(dev.processQueue(q), true);
    assert.deepEqual(drv.used(0), { id: 0, len: 100064 });
    assert.ok(mem.read(0x4000, 64).some((b) => b !== 0));
    assert.ok(mem.read(0x10000 + 99000, 1000).some((b) => b !== 0));
    // a bad chain is completed with length 0
    drv.setDesc(2, 0x900000, 16, W);
    drv.publish(2);
    dev.processQueue(q);
    assert.deepEqual(drv.used(1), { id: 2, len: 0 });
    assert.deepEqual(dev.counters.snapshot(), { read_bytes: 100064, read_ops: 1 });
    if (src instanceof FileEntropySource) src.close();
  });
}
