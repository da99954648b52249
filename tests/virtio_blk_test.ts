import assert from "node:assert/strict";
import { GuestMemory } from "../vmm/memory.ts";
import { SplitQueue } from "../devices/virtio/queue.ts";
import {
  blkConfigSpace,
  BlkDevice,
  blkFeatures,
  type Disk,
  type DiskBatch,
  FileDisk,
  MemoryDisk,
} from "../devices/virtio/blk.ts";
import {
  BLK_F,
  BLK_S,
  BLK_T,
  F,
  featureBit,
  VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_WRITE as W,
} from "../devices/virtio/constants.ts";
import { FakeDriverQueue } from "./virtio_driver.ts";
import { openDiskImage, ShimFileDisk, UringBatch } from "../devices/virtio/device_blk.ts";
import { shim } from "../ffi/shim.ts";

const HDR = 0x4000, DATA = 0x10000, STATUS = 0x6000;

function setup(disk: Disk) {
  const mem = GuestMemory.fromBuffers([{ gpa: 0, size: 0x40000 }]);
  const drv = new FakeDriverQueue(mem, 0x1000, 16);
  const q = new SplitQueue(mem, drv.config, { eventIdx: true });
  const dev = new BlkDevice(disk);
  /** Builds header / data / status descriptors and runs the queue; returns {status, used len}. */
  const run = (type: number, sector: number, dataLen: number, dataWritable: boolean) => {
    mem.writeU32(HDR, type);
    mem.writeU32(HDR + 4, 0);
    mem.writeU64(HDR + 8, sector);
    mem.writeU8(STATUS, 0xee);
    let n = 0;
    drv.setDesc(n, HDR, 16, NEXT, n + 1);
    n++;
    if (dataLen > 0) {
      drv.setDesc(n, DATA, dataLen, NEXT | (dataWritable ? W : 0), n + 1);
      n++;
    }
    drv.setDesc(n, STATUS, 1, W);
    const before = drv.usedIdx();
    drv.publish(0);
    dev.processQueue(q);
    assert.equal(drv.usedIdx(), (before + 1) & 0xffff);
    return { status: mem.readU8(STATUS), len: drv.used(before).len };
  };
  return { mem, drv, q, dev, run };
}

Deno.test("blk: features and config space", () => {
  const f = blkFeatures({ readonly: true }, { numQueues: 4 });
  for (
    const b of [F.VERSION_1, F.EVENT_IDX, BLK_F.RO, BLK_F.FLUSH, BLK_F.MQ, BLK_F.BLK_SIZE, BLK_F.SEG_MAX]
  ) {
    assert.notEqual(f & featureBit(b), 0n, `bit ${b}`);
  }
  assert.equal(blkFeatures({ readonly: false }) & featureBit(BLK_F.RO), 0n);
  const c = new DataView(blkConfigSpace({ size: 1 << 20 }, { numQueues: 4, segMax: 254 }).buffer);
  assert.equal(c.getBigUint64(0, true), 2048n);
  assert.equal(c.getUint32(12, true), 254);
  assert.equal(c.getUint32(20, true), 512);
  assert.equal(c.getUint16(34, true), 4);
});

Deno.test("blk: read, write, flush, get-id on a memory disk", () => {
  const disk = new MemoryDisk(64 * 512, false, "serial-0123456789abcdefXYZ");
  for (let i = 0; i < disk.data.length; i++) disk.data[i] = i % 251;
  const { mem, run, dev } = setup(disk);
  let r = run(BLK_T.IN, 2, 1024, true);
  assert.deepEqual(r, { status: BLK_S.OK, len: 1025 });
  assert.deepEqual(mem.read(DATA, 1024), disk.data.slice(1024, 2048));
  mem.fill(DATA, 512, 0x5a);
  r = run(BLK_T.OUT, 63, 512, false);
  assert.deepEqual(r, { status: BLK_S.OK, len: 1 });
  assert.ok(disk.data.subarray(63 * 512).every((b) => b === 0x5a));
  r = run(BLK_T.FLUSH, 0, 0, false);
  assert.deepEqual(r, { status: BLK_S.OK, len: 1 });
  assert.equal(disk.flushes, 1);
  r = run(BLK_T.GET_ID, 0, 20, true);
  assert.deepEqual(r, { status: BLK_S.OK, len: 21 });
  assert.equal(new TextDecoder().decode(mem.read(DATA, 20)), "serial-0123456789abc");
  assert.deepEqual(dev.counters.snapshot(), {
    read_bytes: 1024,
    write_bytes: 512,
    read_ops: 1,
    write_ops: 1,
  });
});

Deno.test("blk: bounds, alignment, unsupported and read-only", () => {
  const disk = new MemoryDisk(8 * 512);
  const { run } = setup(disk);
  assert.equal(run(BLK_T.IN, 7, 512, true).status, BLK_S.OK);
  assert.deepEqual(run(BLK_T.IN, 7, 1024, true), { status: BLK_S.IOERR, len: 1 });
  assert.equal(run(BLK_T.IN, 8, 512, true).status, BLK_S.IOERR);
  assert.equal(run(BLK_T.OUT, 2 ** 52, 512, false).status, BLK_S.IOERR);
  assert.equal(run(BLK_T.IN, 0, 100, true).status, BLK_S.IOERR); // not a sector multiple
  assert.equal(run(BLK_T.DISCARD, 0, 16, false).status, BLK_S.UNSUPP);
  assert.equal(run(BLK_T.WRITE_ZEROES, 0, 16, false).status, BLK_S.UNSUPP);
  assert.equal(run(0x1234, 0, 0, false).status, BLK_S.UNSUPP);
  const ro = setup(new MemoryDisk(8 * 512, true));
  assert.equal(ro.run(BLK_T.OUT, 0, 512, false).status, BLK_S.IOERR);
  assert.equal(ro.run(BLK_T.IN, 0, 512, true).status, BLK_S.OK);
  assert.equal(ro.run(BLK_T.FLUSH, 0, 0, false).status, BLK_S.OK);
  assert.equal(ro.dev.counters.snapshot().write_ops, 0);
});

Deno.test("blk: malformed requests", () => {
  const { mem, drv, q, dev } = setup(new MemoryDisk(8 * 512));
  // short header: IOERR in the status byte
  drv.setDesc(0, HDR, 8, NEXT, 1);
  drv.setDesc(1, STATUS, 1, W);
  drv.publish(0);
  dev.processQueue(q);
  assert.equal(mem.readU8(STATUS), BLK_S.IOERR);
  assert.deepEqual(drv.used(0), { id: 0, len: 1 });
  // no writable byte at all: completed with length 0, nothing written
  drv.setDesc(0, HDR, 16);
  drv.publish(0);
  dev.processQueue(q);
  assert.deepEqual(drv.used(1), { id: 0, len: 0 });
  // broken chain (next out of range): completed with length 0
  drv.setDesc(0, HDR, 16, NEXT, 99);
  drv.publish(0);
  dev.processQueue(q);
  assert.deepEqual(drv.used(2), { id: 0, len: 0 });
  // invalid head: skipped
  drv.publish(77);
  dev.processQueue(q);
  assert.equal(drv.usedIdx(), 3);
  // header split across descriptors, data sharing the header's buffer (any layout)
  mem.writeU32(0x7000, BLK_T.OUT);
  mem.writeU64(0x7008, 1);
  mem.fill(0x7010, 512, 0x33);
  drv.setDesc(0, 0x7000, 4, NEXT, 1);
  drv.setDesc(1, 0x7004, 12 + 512, NEXT, 2);
  drv.setDesc(2, STATUS, 1, W);
  drv.publish(0);
  dev.processQueue(q);
  assert.equal(mem.readU8(STATUS), BLK_S.OK);
  assert.ok((dev.disk as MemoryDisk).data.subarray(512, 1024).every((b) => b === 0x33));
  // a disk error becomes IOERR
  const bad: Disk = {
    size: 4096,
    readonly: false,
    id: "x",
    readAt() {
      throw new Error("EIO");
    },
    writeAt() {
      throw new Error("EIO");
    },
    flush() {
      throw new Error("EIO");
    },
  };
  const b = setup(bad);
  assert.deepEqual(b.run(BLK_T.IN, 0, 512, true), { status: BLK_S.IOERR, len: 1 });
  assert.equal(b.run(BLK_T.FLUSH, 0, 0, false).status, BLK_S.IOERR);
});

Deno.test("blk: file-backed disk", () => {
  const path = Deno.makeTempFileSync({ suffix: ".img" });
  try {
    const init = new Uint8Array(16 * 512);
    for (let i = 0; i < init.length; i++) init[i] = (i * 7) & 0xff;
    Deno.writeFileSync(path, init);
    const disk = new FileDisk(path);
    const { mem, run } = setup(disk);
    assert.equal(run(BLK_T.IN, 3, 2048, true).status, BLK_S.OK);
    assert.deepEqual(mem.read(DATA, 2048), init.slice(3 * 512, 7 * 512));
    mem.fill(DATA, 1024, 0xc3);
    assert.equal(run(BLK_T.OUT, 14, 1024, false).status, BLK_S.OK);
    assert.equal(run(BLK_T.OUT, 15, 1024, false).status, BLK_S.IOERR);
    assert.equal(run(BLK_T.FLUSH, 0, 0, false).status, BLK_S.OK);
    disk.close();
    const after = Deno.readFileSync(path);
    assert.equal(after.length, init.length);
    assert.ok(after.subarray(14 * 512).every((b) => b === 0xc3));
    assert.deepEqual(after.subarray(0, 14 * 512), init.subarray(0, 14 * 512));
    const ro = new FileDisk(path, true);
    const r = setup(ro);
    assert.equal(r.run(BLK_T.OUT, 0, 512, false).status, BLK_S.IOERR);
    assert.equal(r.run(BLK_T.GET_ID, 0, 20, true).status, BLK_S.OK);
    ro.close();
  } finally {
    Deno.removeSync(path);
  }
});

/** A shim-backed disk that counts the per-buffer fallback calls (the vectored paths must make none). */
class CountingDisk extends ShimFileDisk {
  perBuffer = 0;
  override readAt(b: Uint8Array, o: number): number {
    this.perBuffer++;
    return super.readAt(b, o);
  }
  override writeAt(b: Uint8Array, o: number): number {
    this.perBuffer++;
    return super.writeAt(b, o);
  }
}

Deno.test("blk: a request spread over several buffers is one preadv / pwritev on a shim-backed image", () => {
  const path = Deno.makeTempFileSync({ suffix: ".img" });
  try {
    const init = new Uint8Array(16 * 512);
    for (let i = 0; i < init.length; i++) init[i] = (i * 13 + 5) & 0xff;
    Deno.writeFileSync(path, init);
    const { fd, size } = openDiskImage(path);
    const disk = new CountingDisk(fd, size, false, "vec");
    const { mem, drv, q, dev } = setup(disk);
    const segs: [number, number][] = [[DATA, 512], [DATA + 0x2000, 1024], [DATA + 0x5000, 512]];
    const request = (type: number, sector: number, writable: boolean) => {
      mem.writeU32(HDR, type);
      mem.writeU64(HDR + 8, sector);
      drv.setDesc(0, HDR, 16, NEXT, 1);
      segs.forEach(([gpa, len], i) => drv.setDesc(i + 1, gpa, len, NEXT | (writable ? W : 0), i + 2));
      drv.setDesc(segs.length + 1, STATUS, 1, W);
      drv.publish(0);
      dev.processQueue(q);
      return mem.readU8(STATUS);
    };
    assert.equal(request(BLK_T.IN, 2, true), BLK_S.OK);
    let off = 2 * 512;
    for (const [gpa, len] of segs) {
      assert.deepEqual(mem.read(gpa, len), init.slice(off, off + len));
      off += len;
    }
    segs.forEach(([gpa, len], i) => mem.fill(gpa, len, 0xa0 + i));
    assert.equal(request(BLK_T.OUT, 8, false), BLK_S.OK);
    assert.equal(disk.perBuffer, 0, "no per-buffer fallback");
    shim().kvs_close(fd);
    const after = Deno.readFileSync(path);
    assert.ok(after.subarray(8 * 512, 9 * 512).every((b) => b === 0xa0));
    assert.ok(after.subarray(9 * 512, 11 * 512).every((b) => b === 0xa1));
    assert.ok(after.subarray(11 * 512, 12 * 512).every((b) => b === 0xa2));
    assert.deepEqual(after.subarray(0, 8 * 512), init.subarray(0, 8 * 512));
  } finally {
    Deno.removeSync(path);
  }
});

Deno.test("blk: header and data in one buffer, data and status in one buffer (any layout), straight from guest addresses", () => {
  const path = Deno.makeTempFileSync({ suffix: ".img" });
  try {
    const init = new Uint8Array(16 * 512);
    for (let i = 0; i < init.length; i++) init[i] = (i * 7 + 3) & 0xff;
    Deno.writeFileSync(path, init);
    const { fd, size } = openDiskImage(path);
    const disk = new CountingDisk(fd, size, false, "any");
    const { mem, drv, q, dev } = setup(disk);
    // Write: the header and the first 512 data bytes share one buffer, 1024 more bytes follow.
    mem.writeU32(HDR, BLK_T.OUT);
    mem.writeU64(HDR + 8, 4);
    mem.fill(HDR + 16, 512, 0x11);
    mem.fill(DATA, 1024, 0x22);
    drv.setDesc(0, HDR, 16 + 512, NEXT, 1);
    drv.setDesc(1, DATA, 1024, NEXT, 2);
    drv.setDesc(2, STATUS, 1, W);
    drv.publish(0);
    dev.processQueue(q);
    assert.equal(mem.readU8(STATUS), BLK_S.OK);
    // Read: 1024 bytes, then one buffer of 512 data bytes with the status byte after them.
    mem.writeU32(HDR, BLK_T.IN);
    mem.writeU64(HDR + 8, 4);
    mem.fill(DATA, 0x3000, 0);
    drv.setDesc(0, HDR, 16, NEXT, 1);
    drv.setDesc(1, DATA, 1024, NEXT | W, 2);
    drv.setDesc(2, DATA + 0x2000, 512 + 1, W);
    const before = drv.usedIdx();
    drv.publish(0);
    dev.processQueue(q);
    assert.equal(drv.used(before).len, 1536 + 1);
    assert.equal(mem.readU8(DATA + 0x2000 + 512), BLK_S.OK, "status after the data");
    assert.ok(mem.read(DATA, 512).every((b) => b === 0x11));
    assert.ok(mem.read(DATA + 512, 512).every((b) => b === 0x22));
    assert.ok(mem.read(DATA + 0x2000, 512).every((b) => b === 0x22));
    assert.equal(disk.perBuffer, 0, "no per-buffer fallback");
    assert.deepEqual(dev.counters.snapshot(), {
      read_bytes: 1536,
      write_bytes: 1536,
      read_ops: 1,
      write_ops: 1,
    });
    shim().kvs_close(fd);
    const after = Deno.readFileSync(path);
    assert.deepEqual(after.subarray(0, 4 * 512), init.subarray(0, 4 * 512));
    assert.deepEqual(after.subarray(7 * 512), init.subarray(7 * 512));
  } finally {
    Deno.removeSync(path);
  }
});

Deno.test("blk: an io_uring batch runs a notify's reads and writes together and completes them in order", () => {
  const path = Deno.makeTempFileSync({ suffix: ".img" });
  try {
    const init = new Uint8Array(64 * 512);
    for (let i = 0; i < init.length; i++) init[i] = (i * 11 + 1) & 0xff;
    Deno.writeFileSync(path, init);
    const { fd, size } = openDiskImage(path);
    const batch = UringBatch.open(fd, 4);
    assert.ok(batch, "io_uring is available here");
    let runs = 0;
    const counting: DiskBatch = {
      capacity: batch.capacity,
      results: batch.results,
      queue: (w, iov, n, off, tag) => batch.queue(w, iov, n, off, tag),
      run: () => (runs++, batch.run()),
      close: () => batch.close(),
    };
    const mem = GuestMemory.fromBuffers([{ gpa: 0, size: 0x100000 }]);
    const drv = new FakeDriverQueue(mem, 0x1000, 32);
    const q = new SplitQueue(mem, drv.config, { eventIdx: true });
    const dev = new BlkDevice(new ShimFileDisk(fd, size, false, "ring"), undefined, counting);
    // Six requests in one notify: 2 reads, a write, GET_ID (not batched: the three before it finish
    // first), a read past the end (an error, not batched), a read of what the write wrote (alone in its
    // batch: done without the ring).
    const reqs: [number, number, number][] = [ // type, sector, data bytes
      [BLK_T.IN, 0, 1024],
      [BLK_T.IN, 8, 2048],
      [BLK_T.OUT, 20, 1024],
      [BLK_T.GET_ID, 0, 20],
      [BLK_T.IN, 63, 1024],
      [BLK_T.IN, 20, 1024],
    ];
    mem.fill(0x40000 + 2 * 0x2000, 1024, 0x77); // the write's data
    reqs.forEach(([type, sector, bytes], i) => {
      const hdr = 0x20000 + 32 * i, data = 0x40000 + i * 0x2000, status = 0x30000 + i, d = 3 * i;
      mem.writeU32(hdr, type);
      mem.writeU64(hdr + 8, sector);
      mem.writeU8(status, 0xee);
      drv.setDesc(d, hdr, 16, NEXT, d + 1);
      drv.setDesc(d + 1, data, bytes, NEXT | (type === BLK_T.OUT ? 0 : W), d + 2);
      drv.setDesc(d + 2, status, 1, W);
      drv.publish(d);
    });
    dev.processQueue(q);
    assert.equal(runs, 1, "the three before GET_ID run in the ring; the lone read after it, without");
    assert.deepEqual(reqs.map((_, i) => drv.used(i).id), [0, 3, 6, 9, 12, 15], "used in request order");
    assert.deepEqual(reqs.map((_, i) => drv.used(i).len), [1025, 2049, 1, 21, 1, 1025]);
    assert.deepEqual(reqs.map((_, i) => mem.readU8(0x30000 + i)), [0, 0, 0, 0, BLK_S.IOERR, 0]);
    assert.deepEqual(mem.read(0x40000, 1024), init.subarray(0, 1024));
    assert.deepEqual(mem.read(0x42000, 2048), init.subarray(8 * 512, 12 * 512));
    assert.ok(mem.read(0x4a000, 1024).every((b) => b === 0x77), "read after the write sees it");
    assert.deepEqual(dev.counters.snapshot(), {
      read_bytes: 4096,
      write_bytes: 1024,
      read_ops: 3,
      write_ops: 1,
    });
    // A request the kernel fails (the fd is gone: EBADF) is an I/O error for the guest, and the device
    // goes on.
    shim().kvs_close(fd);
    for (const i of [0, 1]) {
      mem.writeU32(0x20000 + 32 * i, BLK_T.IN);
      mem.writeU64(0x20008 + 32 * i, 0);
      mem.writeU8(0x30000 + i, 0xee);
      drv.setDesc(3 * i, 0x20000 + 32 * i, 16, NEXT, 3 * i + 1);
      drv.setDesc(3 * i + 1, 0x40000, 512, NEXT | W, 3 * i + 2);
      drv.setDesc(3 * i + 2, 0x30000 + i, 1, W);
      drv.publish(3 * i);
    }
    dev.processQueue(q);
    assert.equal(runs, 2, "the two reads ran in the ring");
    assert.deepEqual([mem.readU8(0x30000), mem.readU8(0x30001)], [BLK_S.IOERR, BLK_S.IOERR]);
    assert.deepEqual([drv.used(6).len, drv.used(7).len], [1, 1]);
    dev.close();
  } finally {
    Deno.removeSync(path);
  }
});

Deno.test("disk images are locked: a second writer or a reader beside a writer is refused", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-lock-" });
  const path = `${dir}/disk.img`;
  await Deno.writeFile(path, new Uint8Array(1 << 20));
  const close = (fd: number) => shim().kvs_close(fd);
  const a = openDiskImage(path);
  try {
    assert.throws(() => openDiskImage(path), /locked by another process/);
    assert.throws(() => openDiskImage(path, { readonly: true }), /locked by another process/);
  } finally {
    close(a.fd);
  }
  // Readers share; a writer then waits for them to go.
  const r1 = openDiskImage(path, { readonly: true });
  const r2 = openDiskImage(path, { readonly: true });
  assert.throws(() => openDiskImage(path), /locked by another process/);
  close(r1.fd);
  close(r2.fd);
  close(openDiskImage(path).fd);
  await Deno.remove(dir, { recursive: true });
});

Deno.test({
  name: "blk: ENOSPC on the image answers the guest's write with an I/O error; the device goes on",
  // Needs a small filesystem to fill: a tmpfs mounted here (root only; skipped otherwise).
  ignore: Deno.uid() !== 0,
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-enospc-" });
  const mount = await new Deno.Command("mount", { args: ["-t", "tmpfs", "-o", "size=64k", "tmpfs", dir] })
    .output();
  if (!mount.success) {
    console.log(`tmpfs mount failed (${new TextDecoder().decode(mount.stderr).trim()}); skipping`);
    await Deno.remove(dir);
    return;
  }
  try {
    const path = `${dir}/disk.img`;
    await Deno.truncate(path, 1 << 20).catch(async () => {
      await Deno.writeFile(path, new Uint8Array(0));
      await Deno.truncate(path, 1 << 20);
    });
    const img = openDiskImage(path);
    try {
      const { mem, run } = setup(new ShimFileDisk(img.fd, img.size, false, "enospc"));
      mem.fill(DATA, 0x8000, 0x77);
      // Fill the 64 KiB filesystem: sooner or later a write has no space left.
      const statuses: number[] = [];
      for (let sector = 0; sector < 2048 && !statuses.includes(BLK_S.IOERR); sector += 64) {
        statuses.push(run(BLK_T.OUT, sector, 0x8000, false).status);
      }
      assert.ok(statuses.includes(BLK_S.IOERR), `statuses ${statuses}`);
      assert.equal(statuses[0], BLK_S.OK);
      // The device still serves what it can: reading back the first sectors works.
      mem.fill(DATA, 512, 0);
      assert.equal(run(BLK_T.IN, 0, 512, true).status, BLK_S.OK);
      assert.equal(mem.readU8(DATA), 0x77);
    } finally {
      shim().kvs_close(img.fd);
    }
  } finally {
    await new Deno.Command("umount", { args: [dir] }).output();
    await Deno.remove(dir, { recursive: true });
  }
});
