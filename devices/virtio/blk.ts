/**
 * virtio-blk request processing (virtio 1.x, "Block Device"): the device-side logic that turns a
 * descriptor chain into disk I/O and a status byte. Transport, threads and interrupts live elsewhere.
 *
 * Request layout (no framing assumed, as VIRTIO_F_VERSION_1 implies ANY_LAYOUT): the device-readable
 * stream starts with a 16-byte header { u32 type, u32 reserved, u64 sector }; for T_OUT the rest of
 * the readable stream is the data; for T_IN / T_GET_ID the writable stream minus its last byte is the
 * data; the last byte of the writable stream is the status.
 */

import { BLK_F, BLK_ID_BYTES, BLK_S, BLK_T, F, featureBit, SECTOR_SIZE } from "./constants.ts";
import { type DescriptorChain, setIovec, type SplitQueue } from "./queue.ts";

/** Backing store of a block device. Offsets and lengths are in bytes. */
export interface Disk {
  /** Fills buf from offset off; returns bytes read (short only at end of disk). */
  readAt(buf: Uint8Array, off: number): number;
  /** Writes buf at offset off; returns bytes written. */
  writeAt(buf: Uint8Array, off: number): number;
  /**
   * Optional vectored forms: one request for a whole descriptor chain (one preadv/pwritev). They return
   * the bytes moved, or -1 when they cannot take the request; the device then falls back to one call
   * per buffer.
   */
  readvAt?(bufs: readonly Uint8Array[], off: number): number;
  writevAt?(bufs: readonly Uint8Array[], off: number): number;
  /**
   * Optional: one request over `count` entries of a struct iovec array the device filled with host
   * addresses of guest memory (no view per buffer). Returns the bytes moved, or -1 when it cannot take
   * the request (the device then uses the forms above).
   */
  iovAt?(write: boolean, iov: Uint8Array, count: number, off: number): number;
  /** Makes previous writes durable. */
  flush(): void;
  /** Size in bytes. */
  readonly size: number;
  readonly readonly: boolean;
  /** Serial returned by T_GET_ID (at most 20 bytes are used). */
  readonly id: string;
}

/**
 * Requests run side by side: the device queues the requests of one notify, then runs them all and
 * waits for every one (nothing is in flight once {@link run} returns, so pause, reset and snapshot see
 * an idle device). The iovec arrays given to {@link queue} must stay as they are until then.
 */
export interface DiskBatch {
  /** Most requests one batch holds. */
  readonly capacity: number;
  /** After {@link run}: (tag, bytes moved or -errno) pairs. */
  readonly results: Int32Array;
  /** Queues one request over `count` iovecs; false when it cannot (the device then does it itself). */
  queue(write: boolean, iov: Uint8Array, count: number, off: number, tag: number): boolean;
  /** Runs what was queued and waits for all of it; returns how many results there are. */
  run(): number;
  close(): void;
}

/** A disk held in memory (unit tests, scratch disks). */
export class MemoryDisk implements Disk {
  readonly data: Uint8Array;
  flushes = 0;
  constructor(size: number | Uint8Array, readonly readonly = false, readonly id = "dvmm-memdisk") {
    this.data = typeof size === "number" ? new Uint8Array(size) : size;
  }
  get size(): number {
    return this.data.length;
  }
  readAt(buf: Uint8Array, off: number): number {
    const n = Math.max(0, Math.min(buf.length, this.data.length - off));
    buf.set(this.data.subarray(off, off + n));
    return n;
  }
  writeAt(buf: Uint8Array, off: number): number {
    if (this.readonly) throw new Error("read-only disk");
    const n = Math.max(0, Math.min(buf.length, this.data.length - off));
    this.data.set(buf.subarray(0, n), off);
    return n;
  }
  flush(): void {
    this.flushes++;
  }
}

/** A raw image file accessed with Deno's synchronous file APIs. */
export class FileDisk implements Disk {
  readonly #file: Deno.FsFile;
  readonly size: number;
  constructor(path: string, readonly readonly = false, readonly id = defaultSerial(path)) {
    this.#file = Deno.openSync(path, { read: true, write: !readonly });
    this.size = this.#file.statSync().size;
  }
  readAt(buf: Uint8Array, off: number): number {
    this.#file.seekSync(off, Deno.SeekMode.Start);
    let done = 0;
    while (done < buf.length) {
      const n = this.#file.readSync(buf.subarray(done));
      if (n === null || n === 0) break;
      done += n;
    }
    return done;
  }
  writeAt(buf: Uint8Array, off: number): number {
    if (this.readonly) throw new Error("read-only disk");
    this.#file.seekSync(off, Deno.SeekMode.Start);
    let done = 0;
    while (done < buf.length) done += this.#file.writeSync(buf.subarray(done));
    return done;
  }
  flush(): void {
    if (!this.readonly) this.#file.syncDataSync();
  }
  close(): void {
    this.#file.close();
  }
}

function defaultSerial(path: string): string {
  const base = path.split("/").pop() ?? path;
  return base.slice(0, BLK_ID_BYTES);
}

/** Most iovec entries of one request taken straight from guest addresses (Linux's UIO_MAXIOV). */
const IOV_ENTRIES = 1024;
/** Iovecs of one batched request (more than seg_max allows; a longer chain is done on its own). */
const SLOT_IOVECS = 256;
/** errno values a batched request may end with and is then redone for. */
const ERRNO_EINTR = 4;
const ERRNO_EAGAIN = 11;

/**
 * Fills struct iovecs (u32 halves, little-endian host) at entry `at` of `v` with the chain's readable
 * (`write`) or writable buffers: `skip` bytes left out at the start, `total` bytes in all. Returns how
 * many entries it used, or -1 when more than `max` would be needed.
 */
function fillIovecs(
  chain: DescriptorChain,
  write: boolean,
  skip: number,
  total: number,
  v: Uint32Array,
  at: number,
  max: number,
): number {
  const count = write ? chain.readableCount : chain.writableCount;
  let k = 0;
  let left = total;
  for (let i = 0; i < count && left > 0; i++) {
    let addr = write ? chain.readableAddr(i) : chain.writableAddr(i);
    let len = write ? chain.readableLen(i) : chain.writableLen(i);
    if (skip > 0) {
      if (len <= skip) {
        skip -= len;
        continue;
      }
      addr += skip;
      len -= skip;
      skip = 0;
    }
    if (len > left) len = left;
    if (len === 0) continue;
    if (k === max) return -1;
    setIovec(v, at + k, addr, len);
    k++;
    left -= len;
  }
  return left === 0 ? k : -1;
}

/** Knobs of the virtio-blk device model. */
export interface BlkOptions {
  numQueues?: number;
  /** Largest number of data segments per request announced to the driver (SEG_MAX). */
  segMax?: number;
  /** Logical block size announced (BLK_SIZE); requests still count 512-byte sectors. */
  blkSize?: number;
  /** Offer VIRTIO_F_EVENT_IDX (default true) and VIRTIO_F_INDIRECT_DESC (default true). */
  eventIdx?: boolean;
  indirect?: boolean;
}

/** Feature bits offered by a virtio-blk device over this disk. */
export function blkFeatures(disk: { readonly: boolean }, opts: BlkOptions = {}): bigint {
  let f = featureBit(F.VERSION_1) | featureBit(BLK_F.FLUSH) | featureBit(BLK_F.BLK_SIZE) |
    featureBit(BLK_F.SEG_MAX);
  if (opts.eventIdx ?? true) f |= featureBit(F.EVENT_IDX);
  if (opts.indirect ?? true) f |= featureBit(F.INDIRECT_DESC);
  if (disk.readonly) f |= featureBit(BLK_F.RO);
  if ((opts.numQueues ?? 1) > 1) f |= featureBit(BLK_F.MQ);
  return f;
}

/** Size of the virtio-blk configuration structure we expose (up to write_zeroes_may_unmap + pad). */
export const BLK_CONFIG_SIZE = 60;

/**
 * The device configuration space (little endian): capacity @0 (512-byte sectors), size_max @8,
 * seg_max @12, geometry @16, blk_size @20, topology @24..31, writeback @32, num_queues @34,
 * discard / write-zeroes limits @36..59 (zero: not offered).
 */
export function blkConfigSpace(disk: { size: number }, opts: BlkOptions = {}): Uint8Array {
  const b = new Uint8Array(BLK_CONFIG_SIZE);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, BigInt(Math.floor(disk.size / SECTOR_SIZE)), true);
  v.setUint32(12, opts.segMax ?? 128, true);
  v.setUint32(20, opts.blkSize ?? SECTOR_SIZE, true);
  v.setUint16(34, opts.numQueues ?? 1, true);
  return b;
}

/** Names and slots of the block counters (Cloud Hypervisor's names). */
export const BLK_COUNTERS = ["read_bytes", "write_bytes", "read_ops", "write_ops"] as const;

/**
 * Block counters in a Float64Array, optionally over a SharedArrayBuffer so another thread (the REST
 * API's `vm.counters`) can read them while the device worker updates them.
 */
export class BlkCounters {
  readonly values: Float64Array;
  constructor(buffer?: SharedArrayBuffer | ArrayBuffer) {
    this.values = new Float64Array(buffer ?? new SharedArrayBuffer(8 * BLK_COUNTERS.length), 0, 4);
  }
  snapshot(): Record<(typeof BLK_COUNTERS)[number], number> {
    const v = this.values;
    return { read_bytes: v[0], write_bytes: v[1], read_ops: v[2], write_ops: v[3] };
  }
}

/** Result of one request: the status written and the used length to report. */
export interface BlkResult {
  /** BLK_S value, or -1 when there was nowhere to write it. */
  status: number;
  usedLen: number;
}

/** Request processor for one virtio-blk device (shared by all its queues). */
export class BlkDevice {
  readonly counters: BlkCounters;
  /** Sectors the device serves; grows when the disk is resized (vm.resize-disk). */
  capacity: number;
  readonly #hdr = new Uint8Array(16);
  readonly #hdrView = new DataView(this.#hdr.buffer);
  readonly #id = new Uint8Array(BLK_ID_BYTES);
  readonly #result: BlkResult = { status: 0, usedLen: 0 };
  /** The current request's data buffers (reused: no allocation per request beyond the views). */
  readonly #iov: Uint8Array[] = [];
  /** struct iovec[IOV_ENTRIES] for {@link Disk.iovAt}, filled from guest addresses as u32 halves. */
  readonly #iovec = new Uint8Array(16 * IOV_ENTRIES);
  readonly #iovec32 = new Uint32Array(this.#iovec.buffer);

  // Batched requests (see DiskBatch), slot by slot: each slot's iovecs in the slab, and what completing
  // it takes (its head, where its status byte is, how long it is).
  #batch: DiskBatch | null;
  #queued = 0;
  readonly #slab: Uint8Array;
  readonly #slab32: Uint32Array;
  readonly #slotIov: Uint8Array[] = [];
  readonly #sHead: Uint16Array;
  readonly #sCount: Uint16Array;
  readonly #sWrite: Uint8Array;
  readonly #sLen: Float64Array;
  readonly #sDiskOff: Float64Array;
  readonly #sStatusOff: Float64Array;
  readonly #sStatusBytes: (Uint8Array | null)[] = [];
  readonly #sResult: Float64Array;

  /** `batch`: run the requests of each notify side by side (an io_uring); without it, one by one. */
  constructor(readonly disk: Disk, counters?: BlkCounters, batch?: DiskBatch | null) {
    this.counters = counters ?? new BlkCounters();
    this.capacity = Math.floor(disk.size / SECTOR_SIZE);
    this.#id.set(new TextEncoder().encode(disk.id).subarray(0, BLK_ID_BYTES));
    this.#batch = batch && disk.iovAt ? batch : null;
    const slots = this.#batch?.capacity ?? 0;
    this.#slab = new Uint8Array(16 * SLOT_IOVECS * slots);
    this.#slab32 = new Uint32Array(this.#slab.buffer);
    for (let i = 0; i < slots; i++) {
      this.#slotIov.push(this.#slab.subarray(16 * SLOT_IOVECS * i, 16 * SLOT_IOVECS * (i + 1)));
      this.#sStatusBytes.push(null);
    }
    this.#sHead = new Uint16Array(slots);
    this.#sCount = new Uint16Array(slots);
    this.#sWrite = new Uint8Array(slots);
    this.#sLen = new Float64Array(slots);
    this.#sDiskOff = new Float64Array(slots);
    this.#sStatusOff = new Float64Array(slots);
    this.#sResult = new Float64Array(slots);
  }

  /** Ends batching (the worker closes the ring when the device stops). */
  close(): void {
    this.#batch?.close();
    this.#batch = null;
  }

  /**
   * Pops and completes every available chain on q. Returns true when the driver should be
   * interrupted. If q.broken is set afterwards the transport should flag DEVICE_NEEDS_RESET.
   * Reads and writes are queued in the batch (when there is one) and run together; any other request
   * first lets the batch finish, so requests still complete in the order the driver made them.
   */
  processQueue(q: SplitQueue): boolean {
    try {
      for (;;) {
        const chain = q.popChain();
        if (chain === null) break;
        if (q.broken !== null) break;
        if (!chain.headValid) continue; // cannot be completed: there is no valid id to return
        if (this.#batch !== null && this.#enqueue(chain)) {
          if (this.#queued === this.#batch.capacity) this.#runBatch(q);
          continue;
        }
        if (this.#queued > 0) this.#runBatch(q);
        const r = this.handle(chain);
        q.pushUsed(chain.head, r.usedLen);
      }
    } finally {
      // Whatever happened, nothing stays in flight past this pass.
      if (this.#queued > 0) this.#runBatch(q);
    }
    return q.needsInterrupt();
  }

  /**
   * Queues a well-formed read or write in the batch: its iovecs from the chain's guest addresses into
   * the next slot. False (nothing queued) for anything else: the request is then handled on its own,
   * which also reports every error.
   */
  #enqueue(chain: DescriptorChain): boolean {
    if (chain.error !== null || chain.writableBytes < 1 || chain.readAt(0, this.#hdr) !== 16) return false;
    const type = this.#hdrView.getUint32(0, true);
    if (type !== BLK_T.IN && type !== BLK_T.OUT) return false;
    const write = type === BLK_T.OUT;
    if (write && this.disk.readonly) return false;
    const sector = this.#headerSector();
    const statusPos = chain.writableBytes - 1;
    const len = write ? chain.readableBytes - 16 : statusPos;
    if (len <= 0 || !this.#inBounds(sector, len)) return false;
    // The status byte: the last byte of the last non-empty writable buffer.
    let last = chain.writableCount - 1;
    while (last > 0 && chain.writableLen(last) === 0) last--;
    const slot = this.#queued;
    const k = fillIovecs(chain, write, write ? 16 : 0, len, this.#slab32, SLOT_IOVECS * slot, SLOT_IOVECS);
    if (k < 0) return false;
    this.#sHead[slot] = chain.head;
    this.#sCount[slot] = k;
    this.#sWrite[slot] = write ? 1 : 0;
    this.#sLen[slot] = len;
    this.#sDiskOff[slot] = sector * SECTOR_SIZE;
    this.#sStatusBytes[slot] = chain.regionBytes(chain.writableRegion(last));
    this.#sStatusOff[slot] = chain.writableOffset(last) + chain.writableLen(last) - 1;
    this.#sResult[slot] = NaN;
    this.#queued = slot + 1;
    return true;
  }

  /**
   * Runs the batch, then completes its requests in the order they came (status byte, used entry). A
   * lone request is done right here: the ring only pays when requests can overlap.
   */
  #runBatch(q: SplitQueue): void {
    const n = this.#queued;
    this.#queued = 0;
    const batch = this.#batch!;
    if (n > 1) {
      try {
        let queued = 0;
        for (let slot = 0; slot < n; slot++) {
          const write = this.#sWrite[slot] === 1;
          if (batch.queue(write, this.#slotIov[slot], this.#sCount[slot], this.#sDiskOff[slot], slot)) {
            queued++;
          }
        }
        const got = queued > 0 ? batch.run() : 0;
        const res = batch.results;
        for (let i = 0; i < got; i++) {
          const slot = res[2 * i];
          if (slot >= 0 && slot < n) this.#sResult[slot] = res[2 * i + 1];
        }
      } catch {
        this.#batch = null; // the ring failed: one request at a time from now on (results below: redone)
      }
    }
    for (let slot = 0; slot < n; slot++) {
      const write = this.#sWrite[slot] === 1;
      const len = this.#sLen[slot];
      let done = this.#sResult[slot];
      // Alone, short, interrupted or not reported: (once more,) synchronously, from the same iovecs.
      if (done !== len && !(done < 0 && done !== -ERRNO_EINTR && done !== -ERRNO_EAGAIN)) {
        try {
          done = this.disk.iovAt!(write, this.#slotIov[slot], this.#sCount[slot], this.#sDiskOff[slot]);
        } catch {
          done = -1;
        }
      }
      const ok = done === len;
      if (ok) this.#count(write ? 1 : 0, len);
      this.#sStatusBytes[slot]![this.#sStatusOff[slot]] = ok ? BLK_S.OK : BLK_S.IOERR;
      this.#sStatusBytes[slot] = null;
      q.pushUsed(this.#sHead[slot], ok && !write ? len + 1 : 1);
    }
  }

  /** Executes one request; the returned object is reused by the next call. */
  handle(chain: DescriptorChain): BlkResult {
    const r = this.#result;
    r.status = -1;
    r.usedLen = 0;
    if (chain.error !== null || chain.writableBytes < 1) return r; // nowhere (safe) to put a status
    const statusPos = chain.writableBytes - 1;
    let status: number = BLK_S.IOERR;
    let dataWritten = 0;
    if (chain.readAt(0, this.#hdr) === 16) {
      const type = this.#hdrView.getUint32(0, true);
      const sector = this.#headerSector();
      try {
        switch (type) {
          case BLK_T.IN: {
            status = this.#read(chain, sector, statusPos);
            if (status === BLK_S.OK) dataWritten = statusPos;
            break;
          }
          case BLK_T.OUT:
            status = this.#write(chain, sector);
            break;
          case BLK_T.FLUSH:
            this.disk.flush();
            status = BLK_S.OK;
            break;
          case BLK_T.GET_ID: {
            const n = Math.min(BLK_ID_BYTES, statusPos);
            chain.writeAt(0, this.#id.subarray(0, n));
            dataWritten = n;
            status = BLK_S.OK;
            break;
          }
          default:
            status = BLK_S.UNSUPP;
        }
      } catch {
        status = BLK_S.IOERR;
        dataWritten = 0;
      }
    }
    chain.writeByte(statusPos, status);
    r.status = status;
    r.usedLen = dataWritten + 1;
    return r;
  }

  /** The header's sector (read into #hdr); Infinity when it is too large to be exact (never in bounds). */
  #headerSector(): number {
    const hi = this.#hdrView.getUint32(12, true);
    return hi >= 0x200000 ? Infinity : hi * 0x1_0000_0000 + this.#hdrView.getUint32(8, true);
  }

  #inBounds(sector: number, len: number): boolean {
    return len % SECTOR_SIZE === 0 && sector <= this.capacity &&
      sector + len / SECTOR_SIZE <= this.capacity;
  }

  /** Moves the chain's data buffers (in #iov, `total` bytes) to or from the disk at `off`. */
  #transfer(write: boolean, off: number, total: number): boolean {
    const d = this.disk;
    const iov = this.#iov;
    // One vectored request for the whole chain; with O_DIRECT each call is a block request.
    if (iov.length > 1) {
      const n = write ? d.writevAt?.(iov, off) : d.readvAt?.(iov, off);
      if (n === total) return true;
    }
    for (let i = 0; i < iov.length; i++) {
      const view = iov[i];
      if ((write ? d.writeAt(view, off) : d.readAt(view, off)) !== view.length) return false;
      off += view.length;
    }
    return true;
  }

  /**
   * The request straight from the chain's guest addresses (its writable or, for a write, readable side,
   * skipping `skip` bytes, `total` bytes in all) when the disk takes iovecs; false when it does not or
   * the transfer fell short (the caller then goes buffer by buffer).
   */
  #direct(chain: DescriptorChain, write: boolean, skip: number, total: number, off: number): boolean {
    const d = this.disk;
    if (d.iovAt === undefined) return false;
    const k = fillIovecs(chain, write, skip, total, this.#iovec32, 0, IOV_ENTRIES);
    return k >= 0 && d.iovAt(write, this.#iovec, k, off) === total;
  }

  #read(chain: DescriptorChain, sector: number, len: number): number {
    if (!this.#inBounds(sector, len)) return BLK_S.IOERR;
    if (len > 0 && this.#direct(chain, false, 0, len, sector * SECTOR_SIZE)) return this.#count(0, len);
    const iov = this.#iov;
    iov.length = 0;
    let left = len;
    for (let i = 0; i < chain.writableCount && left > 0; i++) {
      let view = chain.writable(i);
      if (view.length > left) view = view.subarray(0, left);
      iov.push(view);
      left -= view.length;
    }
    if (!this.#transfer(false, sector * SECTOR_SIZE, len)) return BLK_S.IOERR;
    return this.#count(0, len);
  }

  /** Counts a done request (`k` 0 = read, 1 = write) of `len` bytes; returns BLK_S.OK. */
  #count(k: number, len: number): number {
    const v = this.counters.values;
    v[k] += len;
    v[k + 2]++;
    return BLK_S.OK;
  }

  #write(chain: DescriptorChain, sector: number): number {
    if (this.disk.readonly) return BLK_S.IOERR;
    const len = chain.readableBytes - 16;
    if (!this.#inBounds(sector, len)) return BLK_S.IOERR;
    if (len > 0 && this.#direct(chain, true, 16, len, sector * SECTOR_SIZE)) return this.#count(1, len);
    const iov = this.#iov;
    iov.length = 0;
    let skip = 16;
    for (let i = 0; i < chain.readableCount; i++) {
      let view = chain.readable(i);
      if (skip > 0) {
        if (view.length <= skip) {
          skip -= view.length;
          continue;
        }
        view = view.subarray(skip);
        skip = 0;
      }
      iov.push(view);
    }
    if (!this.#transfer(true, sector * SECTOR_SIZE, len)) return BLK_S.IOERR;
    return this.#count(1, len);
  }
}
