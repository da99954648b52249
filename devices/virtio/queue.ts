/**
 * Split virtqueue (virtio 1.x, "Split Virtqueues"), device side.
 *
 * The three ring areas are resolved once, when the queue is built, into DataViews over guest RAM;
 * popping a chain then reads descriptors without allocating. One {@link DescriptorChain} object is
 * reused for every chain popped from a queue.
 *
 * Validation policy (a bad chain never throws and never reaches memory outside GuestMemory; it comes
 * back from {@link SplitQueue.popChain} with `error` set, so the device can complete or skip it):
 * - head or `next` index >= queue size, more descriptors than the queue size (this catches loops),
 *   a chain whose byte total exceeds 2^32, a buffer not inside guest RAM (a buffer may span two
 *   regions only when they are adjacent), a device-readable buffer after a device-writable one;
 * - indirect: only when VIRTIO_F_INDIRECT_DESC was negotiated, never together with NEXT (the indirect
 *   descriptor must end the chain; normal descriptors may precede it), table length a non-zero
 *   multiple of 16 holding at most `maxIndirect` entries, the whole table inside one RAM region, no
 *   INDIRECT flag inside the table, loops inside the table.
 * - zero-length buffers are accepted (the spec does not forbid them and they touch no memory): they
 *   count towards the chain length but are dropped from the buffer lists.
 * - an available index that moved by more than the queue size breaks the whole queue: `broken` is
 *   set and every later pop reports it (the transport should then set DEVICE_NEEDS_RESET).
 */

import { GuestMemory } from "../../vmm/memory.ts";
import {
  MAX_QUEUE_SIZE,
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_USED_F_NO_NOTIFY,
} from "./constants.ts";

/** Why a chain (or the queue) was rejected. */
export const ChainError = {
  HEAD_OUT_OF_RANGE: "head index out of range",
  NEXT_OUT_OF_RANGE: "next index out of range",
  TOO_LONG: "chain longer than allowed (loop?)",
  BAD_ADDRESS: "buffer outside guest RAM",
  TOO_LARGE: "chain larger than 4 GiB",
  ORDER: "device-readable buffer after a device-writable one",
  INDIRECT_NOT_NEGOTIATED: "indirect descriptor without VIRTIO_F_INDIRECT_DESC",
  INDIRECT_WITH_NEXT: "indirect descriptor with NEXT set",
  INDIRECT_LEN: "indirect table length not a non-zero multiple of 16",
  INDIRECT_TOO_LONG: "indirect table has too many entries",
  INDIRECT_BAD_ADDRESS: "indirect table outside guest RAM",
  INDIRECT_NESTED: "indirect descriptor inside an indirect table",
  AVAIL_IDX_JUMP: "available index moved by more than the queue size",
} as const;
export type ChainErrorCode = typeof ChainError[keyof typeof ChainError];

/** Raised by the SplitQueue constructor when the queue configuration itself is unusable. */
export class QueueConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "QueueConfigError";
  }
}

/** Addresses and size of a split queue, as programmed by the driver. */
export interface QueueConfig {
  size: number;
  /** Descriptor table GPA (16-byte aligned). */
  descAddr: number;
  /** Driver area = available ring GPA (2-byte aligned). */
  driverAddr: number;
  /** Device area = used ring GPA (4-byte aligned). */
  deviceAddr: number;
}

export interface QueueOptions {
  /** VIRTIO_F_EVENT_IDX negotiated. */
  eventIdx?: boolean;
  /** VIRTIO_F_INDIRECT_DESC negotiated. */
  indirect?: boolean;
  /** Most entries accepted in one indirect table (default: max(queue size, 1024)). */
  maxIndirect?: number;
  /** Restored ring positions (live migration / snapshot); default 0. */
  lastAvailIdx?: number;
  nextUsedIdx?: number;
}

const FENCE = new Int32Array(new SharedArrayBuffer(4));
/** Full memory barrier (a locked instruction on x86): orders our ring stores before later loads. */
export function fence(): void {
  Atomics.exchange(FENCE, 0, 0);
}

const TWO32 = 0x1_0000_0000;

/** Bytes of the descriptor table, available ring and used ring for a queue size. */
export function ringSizes(size: number, eventIdx = true): { desc: number; avail: number; used: number } {
  const ev = eventIdx ? 2 : 0;
  return { desc: 16 * size, avail: 4 + 2 * size + ev, used: 4 + 8 * size + ev };
}

/**
 * One descriptor chain: its buffers split into device-readable and device-writable segments.
 * Segments are (region index, offset in region, length) triples; use the accessors for GPAs,
 * zero-copy views, host addresses, or stream-like copies.
 */
export class DescriptorChain {
  /** Head descriptor index (the id to give back in {@link SplitQueue.pushUsed}). */
  head = 0;
  /** False when the head itself was unusable (then the chain cannot be completed). */
  headValid = false;
  /** Null for a good chain. */
  error: ChainErrorCode | null = null;
  /** Descriptors visited (including zero-length and the indirect-table descriptor). */
  descriptorCount = 0;
  readableCount = 0;
  writableCount = 0;
  /** Total bytes of the readable / writable segments. */
  readableBytes = 0;
  writableBytes = 0;

  #mem: GuestMemory;
  #bytes: Uint8Array[];
  /** Host address of each region as a number (exact: user-space addresses are below 2^47). */
  #hostNum: number[];
  #rReg: Int32Array = new Int32Array(16);
  #rOff: Float64Array = new Float64Array(16);
  #rLen: Float64Array = new Float64Array(16);
  #wReg: Int32Array = new Int32Array(16);
  #wOff: Float64Array = new Float64Array(16);
  #wLen: Float64Array = new Float64Array(16);

  constructor(mem: GuestMemory) {
    this.#mem = mem;
    this.#bytes = mem.regions.map((r) => r.bytes);
    this.#hostNum = mem.regions.map((r) => Number(r.hostAddr));
  }

  /** @internal */
  reset(head: number): void {
    this.head = head;
    this.headValid = false;
    this.error = null;
    this.descriptorCount = 0;
    this.readableCount = 0;
    this.writableCount = 0;
    this.readableBytes = 0;
    this.writableBytes = 0;
  }

  /** @internal */
  addSegment(write: boolean, reg: number, off: number, len: number): void {
    if (write) {
      const n = this.writableCount;
      if (n === this.#wReg.length) {
        [this.#wReg, this.#wOff, this.#wLen] = grow(this.#wReg, this.#wOff, this.#wLen);
      }
      this.#wReg[n] = reg;
      this.#wOff[n] = off;
      this.#wLen[n] = len;
      this.writableCount = n + 1;
      this.writableBytes += len;
    } else {
      const n = this.readableCount;
      if (n === this.#rReg.length) {
        [this.#rReg, this.#rOff, this.#rLen] = grow(this.#rReg, this.#rOff, this.#rLen);
      }
      this.#rReg[n] = reg;
      this.#rOff[n] = off;
      this.#rLen[n] = len;
      this.readableCount = n + 1;
      this.readableBytes += len;
    }
  }

  readableGpa(i: number): number {
    return this.#mem.regions[this.#rReg[i]].gpa + this.#rOff[i];
  }
  readableLen(i: number): number {
    return this.#rLen[i];
  }
  writableGpa(i: number): number {
    return this.#mem.regions[this.#wReg[i]].gpa + this.#wOff[i];
  }
  writableLen(i: number): number {
    return this.#wLen[i];
  }
  /** Zero-copy view of readable segment i. */
  readable(i: number): Uint8Array {
    const o = this.#rOff[i];
    return this.#bytes[this.#rReg[i]].subarray(o, o + this.#rLen[i]);
  }
  /** Zero-copy view of writable segment i (writes reach the guest). */
  writable(i: number): Uint8Array {
    const o = this.#wOff[i];
    return this.#bytes[this.#wReg[i]].subarray(o, o + this.#wLen[i]);
  }
  /** Host address of readable segment i (for iovecs; 0-based in test memory). */
  readableHost(i: number): bigint {
    return this.#mem.regions[this.#rReg[i]].hostAddr + BigInt(this.#rOff[i]);
  }
  writableHost(i: number): bigint {
    return this.#mem.regions[this.#wReg[i]].hostAddr + BigInt(this.#wOff[i]);
  }

  /** Copies readable bytes starting at stream offset `pos` into dst; returns bytes copied. */
  readAt(pos: number, dst: Uint8Array): number {
    let done = 0;
    for (let i = 0; i < this.readableCount && done < dst.length; i++) {
      const len = this.#rLen[i];
      if (pos >= len) {
        pos -= len;
        continue;
      }
      const n = Math.min(len - pos, dst.length - done);
      const o = this.#rOff[i] + pos;
      dst.set(this.#bytes[this.#rReg[i]].subarray(o, o + n), done);
      done += n;
      pos = 0;
    }
    return done;
  }

  /** Copies src into the writable stream starting at offset `pos`; returns bytes copied. */
  writeAt(pos: number, src: Uint8Array): number {
    let done = 0;
    for (let i = 0; i < this.writableCount && done < src.length; i++) {
      const len = this.#wLen[i];
      if (pos >= len) {
        pos -= len;
        continue;
      }
      const n = Math.min(len - pos, src.length - done);
      const o = this.#wOff[i] + pos;
      this.#bytes[this.#wReg[i]].set(src.subarray(done, done + n), o);
      done += n;
      pos = 0;
    }
    return done;
  }

  /** Host address of readable segment i as a number (no BigInt: for iovecs filled as u32 halves). */
  readableAddr(i: number): number {
    return this.#hostNum[this.#rReg[i]] + this.#rOff[i];
  }
  writableAddr(i: number): number {
    return this.#hostNum[this.#wReg[i]] + this.#wOff[i];
  }

  /** Region index (into the guest memory's regions) of writable segment i. */
  writableRegion(i: number): number {
    return this.#wReg[i];
  }
  /** Offset inside its region of writable segment i. */
  writableOffset(i: number): number {
    return this.#wOff[i];
  }

  /** The bytes of guest memory region `reg` (writes reach the guest). */
  regionBytes(reg: number): Uint8Array {
    return this.#bytes[reg];
  }

  /** Writes one byte at writable stream offset pos; false when out of range. */
  writeByte(pos: number, value: number): boolean {
    for (let i = 0; i < this.writableCount; i++) {
      const len = this.#wLen[i];
      if (pos < len) {
        this.#bytes[this.#wReg[i]][this.#wOff[i] + pos] = value;
        return true;
      }
      pos -= len;
    }
    return false;
  }
}

function grow(
  reg: Int32Array,
  off: Float64Array,
  len: Float64Array,
): [Int32Array, Float64Array, Float64Array] {
  const r = new Int32Array(reg.length * 2);
  const o = new Float64Array(reg.length * 2);
  const l = new Float64Array(reg.length * 2);
  r.set(reg);
  o.set(off);
  l.set(len);
  return [r, o, l];
}

/** iovec k of a u32 view over an iovec array = (addr, len), as u32 halves (little-endian host). */
export function setIovec(v: Uint32Array, k: number, addr: number, len: number): void {
  v[4 * k] = addr >>> 0;
  v[4 * k + 1] = Math.floor(addr / TWO32);
  v[4 * k + 2] = len;
  v[4 * k + 3] = 0;
}

/** Device side of one split virtqueue. */
export class SplitQueue {
  readonly size: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  readonly maxIndirect: number;
  /** Next available-ring index the device will read (free-running u16). */
  lastAvailIdx: number;
  /** Next used-ring index the device will write (free-running u16). */
  nextUsedIdx: number;
  /** Set when the driver broke the queue (e.g. avail idx jumped); every pop then reports it. */
  broken: ChainErrorCode | null = null;

  readonly #mem: GuestMemory;
  readonly #regions: { gpa: number; size: number }[];
  readonly #views: DataView[];
  readonly #desc: DataView;
  readonly #avail: DataView;
  readonly #used: DataView;
  readonly #chain: DescriptorChain;
  #signalledUsed: number;
  #notifyEnabled = true;

  constructor(mem: GuestMemory, cfg: QueueConfig, opts: QueueOptions = {}) {
    const { size } = cfg;
    if (!Number.isInteger(size) || size < 1 || size > MAX_QUEUE_SIZE || (size & (size - 1)) !== 0) {
      throw new QueueConfigError(`bad queue size ${size}`);
    }
    if (cfg.descAddr % 16 !== 0) throw new QueueConfigError("descriptor table not 16-byte aligned");
    if (cfg.driverAddr % 2 !== 0) throw new QueueConfigError("available ring not 2-byte aligned");
    if (cfg.deviceAddr % 4 !== 0) throw new QueueConfigError("used ring not 4-byte aligned");
    this.size = size;
    this.eventIdx = opts.eventIdx ?? false;
    this.indirect = opts.indirect ?? false;
    this.maxIndirect = opts.maxIndirect ?? Math.max(size, 1024);
    this.lastAvailIdx = (opts.lastAvailIdx ?? 0) & 0xffff;
    this.nextUsedIdx = (opts.nextUsedIdx ?? 0) & 0xffff;
    this.#signalledUsed = this.nextUsedIdx;
    this.#mem = mem;
    this.#regions = mem.regions.map((r) => ({ gpa: r.gpa, size: r.bytes.length }));
    this.#views = mem.regions.map((r) =>
      new DataView(r.bytes.buffer, r.bytes.byteOffset, r.bytes.byteLength)
    );
    const sz = ringSizes(size, this.eventIdx);
    this.#desc = this.#ringView(cfg.descAddr, sz.desc, "descriptor table");
    this.#avail = this.#ringView(cfg.driverAddr, sz.avail, "available ring");
    this.#used = this.#ringView(cfg.deviceAddr, sz.used, "used ring");
    this.#chain = new DescriptorChain(mem);
  }

  #ringView(gpa: number, len: number, what: string): DataView {
    if (!this.#mem.contains(gpa, len)) {
      throw new QueueConfigError(`${what} 0x${gpa.toString(16)}+0x${len.toString(16)} is outside guest RAM`);
    }
    const b = this.#mem.slice(gpa, len);
    return new DataView(b.buffer, b.byteOffset, b.byteLength);
  }

  /** Region index holding gpa (any length), or -1. */
  #regionOf(gpa: number): number {
    const rs = this.#regions;
    for (let i = 0; i < rs.length; i++) {
      const r = rs[i];
      if (gpa >= r.gpa && gpa < r.gpa + r.size) return i;
    }
    return -1;
  }

  /** Number of chains the driver has made available and we have not popped yet. */
  availableCount(): number {
    return (this.#avail.getUint16(2, true) - this.lastAvailIdx) & 0xffff;
  }

  /** The available ring's idx as last written by the driver. */
  availIdx(): number {
    return this.#avail.getUint16(2, true);
  }

  /**
   * The next available chain, or null when the ring is empty. The returned object is reused by the
   * next call. Check `error` before using the buffers.
   */
  popChain(): DescriptorChain | null {
    const chain = this.#chain;
    if (this.broken !== null) {
      chain.reset(0);
      chain.error = this.broken;
      return chain;
    }
    const pending = (this.#avail.getUint16(2, true) - this.lastAvailIdx) & 0xffff;
    if (pending === 0) return null;
    if (pending > this.size) {
      this.broken = ChainError.AVAIL_IDX_JUMP;
      chain.reset(0);
      chain.error = this.broken;
      return chain;
    }
    const head = this.#avail.getUint16(4 + 2 * (this.lastAvailIdx & (this.size - 1)), true);
    this.lastAvailIdx = (this.lastAvailIdx + 1) & 0xffff;
    if (this.eventIdx && this.#notifyEnabled) {
      this.#used.setUint16(4 + 8 * this.size, this.lastAvailIdx, true);
    }
    chain.reset(head);
    if (head >= this.size) {
      chain.error = ChainError.HEAD_OUT_OF_RANGE;
      return chain;
    }
    chain.headValid = true;
    chain.error = this.#walk(chain, head);
    return chain;
  }

  #walk(chain: DescriptorChain, head: number): ChainErrorCode | null {
    const d = this.#desc;
    let idx = head;
    for (let count = 1;; count++) {
      if (count > this.size) return ChainError.TOO_LONG;
      chain.descriptorCount++;
      const o = idx * 16;
      const lo = d.getUint32(o, true);
      const hi = d.getUint32(o + 4, true);
      const len = d.getUint32(o + 8, true);
      const flags = d.getUint16(o + 12, true);
      const next = d.getUint16(o + 14, true);
      if (flags & VIRTQ_DESC_F_INDIRECT) {
        if (!this.indirect) return ChainError.INDIRECT_NOT_NEGOTIATED;
        if (flags & VIRTQ_DESC_F_NEXT) return ChainError.INDIRECT_WITH_NEXT;
        return this.#walkIndirect(chain, lo, hi, len);
      }
      const err = this.#take(chain, flags, lo, hi, len);
      if (err !== null) return err;
      if (!(flags & VIRTQ_DESC_F_NEXT)) return null;
      idx = next;
      if (idx >= this.size) return ChainError.NEXT_OUT_OF_RANGE;
    }
  }

  #walkIndirect(
    chain: DescriptorChain,
    tlo: number,
    thi: number,
    tlen: number,
  ): ChainErrorCode | null {
    if (tlen === 0 || tlen % 16 !== 0) return ChainError.INDIRECT_LEN;
    const n = tlen / 16;
    if (n > this.maxIndirect) return ChainError.INDIRECT_TOO_LONG;
    if (thi >= 0x200000) return ChainError.INDIRECT_BAD_ADDRESS;
    const tgpa = thi * TWO32 + tlo;
    const reg = this.#regionOf(tgpa);
    if (reg < 0) return ChainError.INDIRECT_BAD_ADDRESS;
    const r = this.#regions[reg];
    if (tgpa + tlen > r.gpa + r.size) return ChainError.INDIRECT_BAD_ADDRESS;
    const v = this.#views[reg];
    const base = tgpa - r.gpa;
    let idx = 0;
    for (let count = 1;; count++) {
      if (count > n) return ChainError.TOO_LONG;
      chain.descriptorCount++;
      const o = base + idx * 16;
      const lo = v.getUint32(o, true);
      const hi = v.getUint32(o + 4, true);
      const len = v.getUint32(o + 8, true);
      const flags = v.getUint16(o + 12, true);
      const next = v.getUint16(o + 14, true);
      if (flags & VIRTQ_DESC_F_INDIRECT) return ChainError.INDIRECT_NESTED;
      const err = this.#take(chain, flags, lo, hi, len);
      if (err !== null) return err;
      if (!(flags & VIRTQ_DESC_F_NEXT)) return null;
      idx = next;
      if (idx >= n) return ChainError.NEXT_OUT_OF_RANGE;
    }
  }

  /**
   * Checks one data descriptor of a chain (direct or from an indirect table) and adds its buffer:
   * device-readable buffers may not follow device-writable ones, and the chain stays under 2^32
   * bytes. Zero-length descriptors touch no memory: allowed, and not listed.
   */
  #take(chain: DescriptorChain, flags: number, lo: number, hi: number, len: number): ChainErrorCode | null {
    if (len === 0) return null;
    const write = (flags & VIRTQ_DESC_F_WRITE) !== 0;
    if (!write && chain.writableCount > 0) return ChainError.ORDER;
    if (chain.readableBytes + chain.writableBytes + len > TWO32) return ChainError.TOO_LARGE;
    return this.#addBuffer(chain, write, lo, hi, len);
  }

  /** Resolves [gpa, gpa+len) to region segments (splitting only across adjacent regions). */
  #addBuffer(
    chain: DescriptorChain,
    write: boolean,
    lo: number,
    hi: number,
    len: number,
  ): ChainErrorCode | null {
    if (hi >= 0x200000) return ChainError.BAD_ADDRESS; // beyond 2^53
    let gpa = hi * TWO32 + lo;
    let reg = this.#regionOf(gpa);
    if (reg < 0) return ChainError.BAD_ADDRESS;
    const rs = this.#regions;
    for (;;) {
      const r = rs[reg];
      const off = gpa - r.gpa;
      const room = r.size - off;
      if (len <= room) {
        chain.addSegment(write, reg, off, len);
        return null;
      }
      chain.addSegment(write, reg, off, room);
      gpa += room;
      len -= room;
      reg++;
      if (reg >= rs.length || rs[reg].gpa !== gpa) return ChainError.BAD_ADDRESS;
    }
  }

  /** Puts a completed chain on the used ring and publishes the new used idx. */
  pushUsed(head: number, writtenLen: number): void {
    this.addUsed(head, writtenLen);
    this.publishUsed();
  }

  /**
   * Puts a completed chain on the used ring without publishing it: the driver sees it (and every
   * element added before it) at the next {@link publishUsed}. For elements that must appear together
   * (a virtio-net frame spread over several chains).
   */
  addUsed(head: number, writtenLen: number): void {
    const slot = this.nextUsedIdx & (this.size - 1);
    const u = this.#used;
    u.setUint32(4 + 8 * slot, head, true);
    u.setUint32(8 + 8 * slot, writtenLen >>> 0, true);
    this.nextUsedIdx = (this.nextUsedIdx + 1) & 0xffff;
  }

  /** Publishes the used idx after {@link addUsed}. */
  publishUsed(): void {
    fence(); // the elements must be visible before the index
    this.#used.setUint16(2, this.nextUsedIdx, true);
  }

  /**
   * Whether the driver wants an interrupt for the used entries added since the last call that
   * returned (or would have returned) true. Call after a batch of {@link pushUsed}.
   */
  needsInterrupt(): boolean {
    fence(); // our used idx store before the load of used_event / avail flags
    const now = this.nextUsedIdx;
    const old = this.#signalledUsed;
    if (now === old) return false;
    this.#signalledUsed = now;
    if (this.eventIdx) {
      const usedEvent = this.#avail.getUint16(4 + 2 * this.size, true);
      return needEvent(usedEvent, now, old);
    }
    return (this.#avail.getUint16(0, true) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
  }

  /** Asks the driver to stop notifying (best effort; used while the device is busy polling). */
  disableNotification(): void {
    this.#notifyEnabled = false;
    if (!this.eventIdx) {
      this.#used.setUint16(0, this.#used.getUint16(0, true) | VIRTQ_USED_F_NO_NOTIFY, true);
    }
  }

  /**
   * Asks the driver to notify again. Returns true when chains arrived meanwhile: the caller must
   * process them (otherwise a notification could be lost).
   */
  enableNotification(): boolean {
    this.#notifyEnabled = true;
    if (this.eventIdx) this.#used.setUint16(4 + 8 * this.size, this.lastAvailIdx, true);
    else this.#used.setUint16(0, this.#used.getUint16(0, true) & ~VIRTQ_USED_F_NO_NOTIFY, true);
    fence();
    return this.availableCount() !== 0 || this.broken !== null;
  }
}

/**
 * The virtio event-index test: true when the index the other side asked about (`eventIdx`) lies in
 * [oldIdx, newIdx), i.e. the entry it waits for was among those just published (mod 2^16).
 */
export function needEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}
