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
import type { DescriptorChain, SplitQueue } from "./queue.ts";

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
  /** Makes previous writes durable. */
  flush(): void;
  /** Size in bytes. */
  readonly size: number;
  readonly readonly: boolean;
  /** Serial returned by T_GET_ID (at most 20 bytes are used). */
  readonly id: string;
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

  constructor(readonly disk: Disk, counters?: BlkCounters) {
    this.counters = counters ?? new BlkCounters();
    this.capacity = Math.floor(disk.size / SECTOR_SIZE);
    this.#id.set(new TextEncoder().encode(disk.id).subarray(0, BLK_ID_BYTES));
  }

  /**
   * Pops and completes every available chain on q. Returns true when the driver should be
   * interrupted. If q.broken is set afterwards the transport should flag DEVICE_NEEDS_RESET.
   */
  processQueue(q: SplitQueue): boolean {
    for (;;) {
      const chain = q.popChain();
      if (chain === null) break;
      if (q.broken !== null) break;
      if (!chain.headValid) continue; // cannot be completed: there is no valid id to return
      const r = this.handle(chain);
      q.pushUsed(chain.head, r.usedLen);
    }
    return q.needsInterrupt();
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
      const lo = this.#hdrView.getUint32(8, true);
      const hi = this.#hdrView.getUint32(12, true);
      const sector = hi >= 0x200000 ? Infinity : hi * 0x1_0000_0000 + lo;
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

  #read(chain: DescriptorChain, sector: number, len: number): number {
    if (!this.#inBounds(sector, len)) return BLK_S.IOERR;
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
    const v = this.counters.values;
    v[0] += len;
    v[2]++;
    return BLK_S.OK;
  }

  #write(chain: DescriptorChain, sector: number): number {
    if (this.disk.readonly) return BLK_S.IOERR;
    const len = chain.readableBytes - 16;
    if (!this.#inBounds(sector, len)) return BLK_S.IOERR;
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
    const v = this.counters.values;
    v[1] += len;
    v[3]++;
    return BLK_S.OK;
  }
}
