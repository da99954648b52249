/**
 * Type-0 PCI configuration space (256 bytes conventional + extended space up to 4 KiB for ECAM).
 *
 * Register values live in a byte array that can sit in a SharedArrayBuffer, so every thread that
 * handles config accesses (vCPU workers) can build the same object over the same state: pass the
 * state of the first instance to the others (construction is deterministic; only the first instance
 * initialises the bytes). Accesses must be serialised by the caller (devices/shared.ts lock).
 *
 * Writes go through a per-byte writable mask and a write-1-to-clear mask, which is how read-only
 * fields, status bits and the BAR sizing protocol (write all-ones, read back ~(size-1) | flags) work.
 */

export const PCI_CONFIG_SIZE = 4096;
export const PCI_CFG = {
  VENDOR_ID: 0x00,
  DEVICE_ID: 0x02,
  COMMAND: 0x04,
  STATUS: 0x06,
  REVISION: 0x08,
  CLASS_PROG: 0x09,
  CACHE_LINE: 0x0c,
  LATENCY: 0x0d,
  HEADER_TYPE: 0x0e,
  BAR0: 0x10,
  SUBSYS_VENDOR: 0x2c,
  SUBSYS_ID: 0x2e,
  ROM: 0x30,
  CAP_PTR: 0x34,
  INT_LINE: 0x3c,
  INT_PIN: 0x3d,
} as const;
export const CMD_IO = 1;
export const CMD_MEMORY = 2;
export const CMD_MASTER = 4;
export const CMD_INTX_DISABLE = 0x400;
export const STATUS_CAP_LIST = 0x10;

export type BarKind = "mem32" | "mem64" | "io";
/** A BAR of a function: index 0..5 (a mem64 BAR also uses index+1). size is a power of two. */
export interface BarSpec {
  index: number;
  size: number;
  kind: BarKind;
  prefetchable?: boolean;
}

export interface PciConfigParams {
  vendorId: number;
  deviceId: number;
  /** base class << 16 | subclass << 8 | prog-if */
  classCode: number;
  revision?: number;
  subsystemVendorId?: number;
  subsystemId?: number;
  /** Header type byte (0 = endpoint; bit 7 = multi-function). */
  headerType?: number;
  /** INTx pin (0 = none, 1 = INTA#...). */
  interruptPin?: number;
  bars?: BarSpec[];
}

/** Called when the address at which a BAR decodes changes (-1 = not decoded). */
export type BarChangeHandler = (bar: number, oldAddr: number, newAddr: number, spec: BarSpec) => void;

const STATE_CFG = 0;
const STATE_BARS = PCI_CONFIG_SIZE; // 6 x f64 last reported address
const STATE_SIZING = STATE_BARS + 48; // 6 x u8 sizing flags
/** Bytes of shared state of one PciConfigSpace. */
export const PCI_CONFIG_STATE_SIZE = STATE_SIZING + 8;

const TWO32 = 0x1_0000_0000;

export class PciConfigSpace {
  /** The 4 KiB register file (a view over the shared state). */
  readonly bytes: Uint8Array;
  readonly state: SharedArrayBuffer | ArrayBuffer;
  /** True for the instance that initialised the state. */
  readonly fresh: boolean;
  readonly bars: (BarSpec | undefined)[] = [];
  /** Invoked after guest writes that changed where a BAR decodes. */
  onBarChange: BarChangeHandler | null = null;
  readonly #view: DataView;
  readonly #lastAddr: Float64Array;
  readonly #sizing: Uint8Array;
  readonly #wmask = new Uint8Array(PCI_CONFIG_SIZE);
  readonly #w1c = new Uint8Array(PCI_CONFIG_SIZE);
  readonly #writeHooks: ((offset: number, size: number) => void)[] = [];
  readonly #readHooks: ((offset: number, size: number) => void)[] = [];
  #nextCap = 0x40;
  #lastCap = -1;

  constructor(params: PciConfigParams, state?: SharedArrayBuffer | ArrayBuffer) {
    this.fresh = state === undefined;
    this.state = state ?? new SharedArrayBuffer(PCI_CONFIG_STATE_SIZE);
    if (this.state.byteLength < PCI_CONFIG_STATE_SIZE) throw new Error("PCI config state too small");
    this.bytes = new Uint8Array(this.state, STATE_CFG, PCI_CONFIG_SIZE);
    this.#view = new DataView(this.state, STATE_CFG, PCI_CONFIG_SIZE);
    this.#lastAddr = new Float64Array(this.state, STATE_BARS, 6);
    this.#sizing = new Uint8Array(this.state, STATE_SIZING, 6);
    const v = this.#view;
    if (this.fresh) {
      v.setUint16(PCI_CFG.VENDOR_ID, params.vendorId, true);
      v.setUint16(PCI_CFG.DEVICE_ID, params.deviceId, true);
      v.setUint8(PCI_CFG.REVISION, params.revision ?? 0);
      v.setUint8(PCI_CFG.CLASS_PROG, params.classCode & 0xff);
      v.setUint16(PCI_CFG.CLASS_PROG + 1, (params.classCode >> 8) & 0xffff, true);
      v.setUint8(PCI_CFG.HEADER_TYPE, params.headerType ?? 0);
      v.setUint16(PCI_CFG.SUBSYS_VENDOR, params.subsystemVendorId ?? 0, true);
      v.setUint16(PCI_CFG.SUBSYS_ID, params.subsystemId ?? 0, true);
      v.setUint8(PCI_CFG.INT_PIN, params.interruptPin ?? 0);
      this.#lastAddr.fill(-1);
    }
    this.#setMask(PCI_CFG.COMMAND, 2, 0x0547); // IO, MEM, MASTER, PARITY, SERR, INTX_DISABLE
    this.#setMask(PCI_CFG.STATUS, 2, 0xf900, true); // error bits are write-1-to-clear
    this.#setMask(PCI_CFG.CACHE_LINE, 1, 0xff);
    this.#setMask(PCI_CFG.LATENCY, 1, 0xff);
    this.#setMask(PCI_CFG.INT_LINE, 1, 0xff);
    for (const b of params.bars ?? []) this.#addBar(b);
  }

  #setMask(off: number, len: number, mask: number, w1c = false): void {
    const arr = w1c ? this.#w1c : this.#wmask;
    for (let i = 0; i < len; i++) arr[off + i] = (mask >>> (8 * i)) & 0xff;
  }

  #addBar(b: BarSpec): void {
    const { index, size, kind } = b;
    const last = kind === "mem64" ? index + 1 : index;
    if (index < 0 || last > 5 || this.bars[index] || this.bars[last]) {
      throw new Error(`bad BAR index ${index}`);
    }
    const min = kind === "io" ? 4 : 16;
    if (size < min || !Number.isSafeInteger(size) || 2 ** Math.round(Math.log2(size)) !== size) {
      throw new Error(`bad BAR size ${size}`);
    }
    if (kind !== "mem64" && size > 2 ** 31) throw new Error("32-bit BAR too large");
    this.bars[index] = b;
    const off = PCI_CFG.BAR0 + 4 * index;
    const flags = kind === "io" ? 1 : (kind === "mem64" ? 4 : 0) | (b.prefetchable ? 8 : 0);
    const lowMask = size >= TWO32 ? 0 : (~(size - 1) >>> 0) & (kind === "io" ? 0xfffffffc : 0xfffffff0);
    if (this.fresh) this.#view.setUint32(off, flags, true);
    this.#setMask(off, 4, lowMask);
    if (kind === "mem64") {
      this.bars[index + 1] = b;
      const hiMask = size > TWO32 ? (~(size / TWO32 - 1)) >>> 0 : 0xffffffff;
      this.#setMask(off + 4, 4, hiMask);
    }
  }

  /**
   * Appends a capability (body excludes the 2-byte id/next header). Returns its offset. `writable`
   * gives a per-byte writable mask for the body. Call in the same order in every thread.
   */
  addCapability(id: number, body: Uint8Array, writable?: Uint8Array): number {
    const off = this.#nextCap;
    const len = 2 + body.length;
    if (off + len > 0x100) throw new Error("PCI capability area full");
    if (this.fresh) {
      this.bytes[off] = id;
      this.bytes[off + 1] = 0;
      this.bytes.set(body, off + 2);
      if (this.#lastCap < 0) this.bytes[PCI_CFG.CAP_PTR] = off;
      else this.bytes[this.#lastCap + 1] = off;
      this.#view.setUint16(
        PCI_CFG.STATUS,
        this.#view.getUint16(PCI_CFG.STATUS, true) | STATUS_CAP_LIST,
        true,
      );
    }
    if (writable) this.#wmask.set(writable.subarray(0, body.length), off + 2);
    this.#lastCap = off;
    this.#nextCap = (off + len + 3) & ~3;
    return off;
  }

  /** Registers a hook run after every guest write (offset/size of the access). */
  addWriteHook(fn: (offset: number, size: number) => void): void {
    this.#writeHooks.push(fn);
  }
  /** Registers a hook run before every guest read (to refresh computed registers). */
  addReadHook(fn: (offset: number, size: number) => void): void {
    this.#readHooks.push(fn);
  }

  /** Guest read of 1, 2 or 4 bytes; beyond the space reads as all-ones. */
  read(offset: number, size: number): number {
    if (offset < 0 || offset + size > PCI_CONFIG_SIZE) return size === 4 ? 0xffffffff : (1 << (8 * size)) - 1;
    for (const h of this.#readHooks) h(offset, size);
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + this.bytes[offset + i];
    return v;
  }

  /** Guest write of 1, 2 or 4 bytes (masked). */
  write(offset: number, size: number, value: number): void {
    if (offset < 0 || offset + size > PCI_CONFIG_SIZE) return;
    const b = this.bytes;
    for (let i = 0; i < size; i++) {
      const o = offset + i;
      const val = (value >>> (8 * i)) & 0xff;
      const m = this.#wmask[o];
      b[o] = ((b[o] & ~m) | (val & m)) & ~(val & this.#w1c[o]);
    }
    // BAR sizing probes: an all-ones write to a BAR register
    if (offset < PCI_CFG.BAR0 + 24 && offset + size > PCI_CFG.BAR0) {
      for (let reg = 0; reg < 6; reg++) {
        const ro = PCI_CFG.BAR0 + 4 * reg;
        if (offset >= ro + 4 || offset + size <= ro) continue;
        const spec = this.bars[reg];
        if (!spec) continue;
        const allOnes = size === 4 && (value >>> 0) === 0xffffffff;
        this.#sizing[reg] = allOnes ? 1 : 0;
      }
    }
    for (const h of this.#writeHooks) h(offset, size);
    if (offset < PCI_CFG.BAR0 + 24 && offset + size > PCI_CFG.COMMAND) this.#checkBars();
  }

  /** Address the BAR is programmed with (regardless of decode enable), or -1 if beyond 2^53. */
  barAddress(index: number): number {
    const spec = this.bars[index];
    if (!spec || spec.index !== index) return -1;
    const off = PCI_CFG.BAR0 + 4 * index;
    const lo = (this.#view.getUint32(off, true) & (spec.kind === "io" ? 0xfffffffc : 0xfffffff0)) >>> 0;
    if (spec.kind !== "mem64") return lo;
    const hi = this.#view.getUint32(off + 4, true);
    if (hi >= 0x200000) return -1;
    return hi * TWO32 + lo;
  }

  /** Address the BAR currently decodes at: -1 when decoding is off, sizing is under way, or invalid. */
  barDecodeAddress(index: number): number {
    const spec = this.bars[index];
    if (!spec || spec.index !== index) return -1;
    const cmd = this.#view.getUint16(PCI_CFG.COMMAND, true);
    if (!(cmd & (spec.kind === "io" ? CMD_IO : CMD_MEMORY))) return -1;
    if (this.#sizing[index] || (spec.kind === "mem64" && this.#sizing[index + 1])) return -1;
    return this.barAddress(index);
  }

  /** Host-side BAR placement (allocation); does not invoke onBarChange. */
  programBar(index: number, addr: number): void {
    const spec = this.bars[index];
    if (!spec || spec.index !== index || addr % spec.size !== 0) throw new Error("bad BAR programming");
    const off = PCI_CFG.BAR0 + 4 * index;
    const flags = this.#view.getUint32(off, true) & (spec.kind === "io" ? 3 : 0xf);
    this.#view.setUint32(off, ((addr % TWO32) | flags) >>> 0, true);
    if (spec.kind === "mem64") this.#view.setUint32(off + 4, Math.floor(addr / TWO32), true);
    this.#lastAddr[index] = this.barDecodeAddress(index);
  }

  #checkBars(): void {
    for (let i = 0; i < 6; i++) {
      const spec = this.bars[i];
      if (!spec || spec.index !== i) continue;
      const now = this.barDecodeAddress(i);
      const old = this.#lastAddr[i];
      if (now === old) continue;
      this.#lastAddr[i] = now;
      this.onBarChange?.(i, old, now, spec);
    }
  }

  get command(): number {
    return this.#view.getUint16(PCI_CFG.COMMAND, true);
  }
}
