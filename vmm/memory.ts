/**
 * Guest physical memory: bounds-checked, zero-copy access to the regions of guest RAM.
 *
 * Regions are byte views over the host mapping (or plain buffers in tests). Every accessor checks
 * that the whole range lies inside one region and throws {@link GuestMemoryError} otherwise, so a
 * guest-supplied address can never reach host memory outside guest RAM.
 */

/** Raised when a guest physical range is not entirely inside one RAM region. */
export class GuestMemoryError extends Error {
  constructor(readonly gpa: number, readonly length: number) {
    super(`guest memory range 0x${gpa.toString(16)}+0x${length.toString(16)} is outside guest RAM`);
    this.name = "GuestMemoryError";
  }
}

/** One contiguous range of guest RAM. */
export interface GuestRegion {
  /** Guest physical address of the first byte. */
  readonly gpa: number;
  /** The region's bytes; `bytes.length` is its size. */
  readonly bytes: Uint8Array;
  /** Host virtual address of the first byte, when the region is a real mapping (0n in tests). */
  readonly hostAddr: bigint;
}

/** Guest physical memory made of non-overlapping regions. */
export class GuestMemory {
  #regions: GuestRegion[] = [];
  #views: DataView[] = [];

  constructor(regions: GuestRegion[]) {
    this.#set(regions);
  }

  /** The regions, by guest address. */
  get regions(): readonly GuestRegion[] {
    return this.#regions;
  }

  #set(regions: GuestRegion[]): void {
    const sorted = [...regions].sort((a, b) => a.gpa - b.gpa);
    for (let i = 1; i < sorted.length; i++) {
      const prev = sorted[i - 1];
      if (prev.gpa + prev.bytes.length > sorted[i].gpa) throw new Error("guest memory regions overlap");
    }
    this.#regions = sorted;
    this.#views = sorted.map((r) => new DataView(r.bytes.buffer, r.bytes.byteOffset, r.bytes.byteLength));
  }

  /** Adds a region of host memory (memory hotplug); it must not overlap the others. */
  addHostRegion(l: { gpa: number; size: number; hostAddr: bigint }): void {
    this.#set([...this.#regions, ...GuestMemory.fromHost([l]).regions]);
  }

  /** Memory made of plain buffers (tests, tools). */
  static fromBuffers(layout: { gpa: number; size: number }[]): GuestMemory {
    return new GuestMemory(layout.map((l) => {
      const bytes = new Uint8Array(l.size);
      // The buffer's real address, so iovecs built from guest addresses work on it as on mapped RAM.
      return { gpa: l.gpa, bytes, hostAddr: BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(bytes))) };
    }));
  }

  /** Memory over host mappings given by address (works in any thread of the process). */
  static fromHost(layout: { gpa: number; size: number; hostAddr: bigint }[]): GuestMemory {
    return new GuestMemory(layout.map((l) => {
      const ptr = Deno.UnsafePointer.create(l.hostAddr);
      if (ptr === null) throw new Error("null host address for guest memory region");
      const buf = Deno.UnsafePointerView.getArrayBuffer(ptr, l.size);
      return { gpa: l.gpa, bytes: new Uint8Array(buf), hostAddr: l.hostAddr };
    }));
  }

  /** Total bytes of RAM. */
  get size(): number {
    let n = 0;
    for (const r of this.regions) n += r.bytes.length;
    return n;
  }

  /** Index of the region holding [gpa, gpa+len), or -1. */
  #find(gpa: number, len: number): number {
    if (!(gpa >= 0) || !(len >= 0) || !Number.isSafeInteger(gpa + len)) return -1;
    const rs = this.regions;
    for (let i = 0; i < rs.length; i++) {
      const r = rs[i];
      if (gpa >= r.gpa && gpa + len <= r.gpa + r.bytes.length) return i;
    }
    return -1;
  }

  #region(gpa: number, len: number): number {
    const i = this.#find(gpa, len);
    if (i < 0) throw new GuestMemoryError(gpa, len);
    return i;
  }

  /** True when [gpa, gpa+len) lies inside one region. */
  contains(gpa: number, len: number): boolean {
    return this.#find(gpa, len) >= 0;
  }

  /** A zero-copy view of [gpa, gpa+len). Writes through it reach the guest. */
  slice(gpa: number, len: number): Uint8Array {
    const i = this.#region(gpa, len);
    const r = this.regions[i];
    const off = gpa - r.gpa;
    return r.bytes.subarray(off, off + len);
  }

  /** Host address of gpa (for iovecs handed to the kernel); checks [gpa, gpa+len). */
  hostAddress(gpa: number, len: number): bigint {
    const r = this.regions[this.#region(gpa, len)];
    return r.hostAddr + BigInt(gpa - r.gpa);
  }

  /** Copies bytes into guest memory at gpa. */
  write(gpa: number, data: Uint8Array): void {
    this.slice(gpa, data.length).set(data);
  }

  /** Copies len bytes out of guest memory. */
  read(gpa: number, len: number): Uint8Array {
    return this.slice(gpa, len).slice();
  }

  /** Fills [gpa, gpa+len) with a byte value. */
  fill(gpa: number, len: number, value = 0): void {
    this.slice(gpa, len).fill(value);
  }

  #view(gpa: number, len: number): [DataView, number] {
    const i = this.#region(gpa, len);
    return [this.#views[i], gpa - this.regions[i].gpa];
  }

  readU8(gpa: number): number {
    const [v, o] = this.#view(gpa, 1);
    return v.getUint8(o);
  }
  readU16(gpa: number): number {
    const [v, o] = this.#view(gpa, 2);
    return v.getUint16(o, true);
  }
  readU32(gpa: number): number {
    const [v, o] = this.#view(gpa, 4);
    return v.getUint32(o, true);
  }
  /** Reads a little-endian u64 as a number; throws if it exceeds 2^53. */
  readU64(gpa: number): number {
    const [v, o] = this.#view(gpa, 8);
    const n = v.getBigUint64(o, true);
    if (n > BigInt(Number.MAX_SAFE_INTEGER)) throw new GuestMemoryError(Number.MAX_SAFE_INTEGER, 0);
    return Number(n);
  }
  readU64Big(gpa: number): bigint {
    const [v, o] = this.#view(gpa, 8);
    return v.getBigUint64(o, true);
  }
  writeU8(gpa: number, value: number): void {
    const [v, o] = this.#view(gpa, 1);
    v.setUint8(o, value);
  }
  writeU16(gpa: number, value: number): void {
    const [v, o] = this.#view(gpa, 2);
    v.setUint16(o, value, true);
  }
  writeU32(gpa: number, value: number): void {
    const [v, o] = this.#view(gpa, 4);
    v.setUint32(o, value >>> 0, true);
  }
  writeU64(gpa: number, value: number | bigint): void {
    const [v, o] = this.#view(gpa, 8);
    v.setBigUint64(o, BigInt(value), true);
  }
}

/**
 * Guest RAM plugged after boot (memory hotplug), published to the device threads: an append-only table
 * in a SharedArrayBuffer. Int32 [0] is the number of entries; entry i holds gpa, size and host address
 * as three float64s from byte 8 + 24 * i (exact: all below 2^53). A device thread compares the count
 * with what it has taken in whenever it wakes, and maps the new regions before it looks at any ring.
 */
export class GuestMemoryTable {
  static readonly CAPACITY = 256;
  readonly #count: Int32Array;
  readonly #f64: Float64Array;

  constructor(readonly sab: SharedArrayBuffer = new SharedArrayBuffer(8 + 24 * GuestMemoryTable.CAPACITY)) {
    this.#count = new Int32Array(sab, 0, 1);
    this.#f64 = new Float64Array(sab, 8, 3 * GuestMemoryTable.CAPACITY);
  }

  get count(): number {
    return Atomics.load(this.#count, 0);
  }

  /** Main thread: publishes a region (after it is mapped and given to KVM). */
  add(r: { gpa: number; size: number; hostAddr: bigint }): void {
    const n = this.count;
    if (n >= GuestMemoryTable.CAPACITY) throw new Error("too many hot-added memory regions");
    this.#f64[3 * n] = r.gpa;
    this.#f64[3 * n + 1] = r.size;
    this.#f64[3 * n + 2] = Number(r.hostAddr);
    Atomics.store(this.#count, 0, n + 1);
  }

  /** Device thread: adds to `mem` the entries from `seen` on; returns the new count. */
  syncInto(mem: GuestMemory, seen: number): number {
    const n = this.count;
    for (let i = seen; i < n; i++) {
      mem.addHostRegion({
        gpa: this.#f64[3 * i],
        size: this.#f64[3 * i + 1],
        hostAddr: BigInt(this.#f64[3 * i + 2]),
      });
    }
    return n;
  }
}
