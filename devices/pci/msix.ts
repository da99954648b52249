/**
 * MSI-X (PCI Local Bus 3.0 / PCIe, "MSI-X Capability and Table Structure").
 *
 * Capability in config space: id 0x11, Message Control (bits 10:0 table size - 1, bit 14 function
 * mask, bit 15 enable), Table offset/BIR, PBA offset/BIR. The table (16 bytes per vector: address
 * low, address high, data, vector control with bit 0 = mask) and the pending bit array live in a BAR;
 * the owning device forwards BAR accesses in those ranges to {@link Msix.tableRead} & co.
 *
 * State (table + PBA) sits in a SharedArrayBuffer so vCPU workers (guest programming) and device
 * workers ({@link Msix.trigger}) share it. Callers serialise accesses.
 */

import type { PciConfigSpace } from "./config.ts";

export const PCI_CAP_ID_MSIX = 0x11;
export const MSIX_ENABLE = 0x8000;
export const MSIX_FUNCTION_MASK = 0x4000;
export const MSIX_ENTRY_SIZE = 16;
export const MSIX_MAX_VECTORS = 2048;

/** One vector as the guest programmed it. */
export interface MsixVector {
  addressLo: number;
  addressHi: number;
  data: number;
  /** Entry mask bit OR function mask OR MSI-X disabled. */
  masked: boolean;
}

export interface MsixParams {
  vectors: number;
  /** BAR holding the table and the PBA. */
  bar: number;
  /** Offsets inside that BAR (8-byte aligned). */
  tableOffset: number;
  pbaOffset: number;
}

/** Bytes of state for n vectors (table + PBA, PBA rounded to qwords). */
export function msixStateSize(vectors: number): number {
  return vectors * MSIX_ENTRY_SIZE + Math.ceil(vectors / 64) * 8 + 8; // + last seen Message Control
}

export class Msix {
  readonly vectors: number;
  readonly capOffset: number;
  readonly state: SharedArrayBuffer | ArrayBuffer;
  readonly tableSize: number;
  readonly pbaSize: number;
  /** Vector route changed (address/data/effective mask): update GSI routing / irqfd. */
  onVectorChange: ((vector: number, v: MsixVector) => void) | null = null;
  /** A pending vector was unmasked: deliver it now (write its irqfd / KVM_SIGNAL_MSI). */
  onDeliverPending: ((vector: number) => void) | null = null;
  readonly #cfg: PciConfigSpace;
  readonly #table: DataView;
  readonly #tableBytes: Uint8Array;
  readonly #pba: Uint8Array;
  readonly #scratch = new Uint8Array(MSIX_ENTRY_SIZE);
  readonly #last: Uint16Array;

  constructor(cfg: PciConfigSpace, p: MsixParams, state?: SharedArrayBuffer | ArrayBuffer) {
    if (p.vectors < 1 || p.vectors > MSIX_MAX_VECTORS) throw new Error("bad MSI-X vector count");
    if (p.tableOffset % 8 || p.pbaOffset % 8) throw new Error("MSI-X table/PBA must be 8-byte aligned");
    this.vectors = p.vectors;
    this.tableSize = p.vectors * MSIX_ENTRY_SIZE;
    this.pbaSize = Math.ceil(p.vectors / 64) * 8;
    const fresh = state === undefined;
    this.state = state ?? new SharedArrayBuffer(msixStateSize(p.vectors));
    this.#tableBytes = new Uint8Array(this.state, 0, this.tableSize);
    this.#table = new DataView(this.state, 0, this.tableSize);
    this.#pba = new Uint8Array(this.state, this.tableSize, this.pbaSize);
    this.#last = new Uint16Array(this.state, this.tableSize + this.pbaSize, 1);
    if (fresh) { for (let v = 0; v < p.vectors; v++) this.#table.setUint32(v * 16 + 12, 1, true); }
    const body = new Uint8Array(10);
    const bv = new DataView(body.buffer);
    bv.setUint16(0, p.vectors - 1, true);
    bv.setUint32(2, (p.tableOffset | p.bar) >>> 0, true);
    bv.setUint32(6, (p.pbaOffset | p.bar) >>> 0, true);
    const writable = new Uint8Array(10);
    writable[1] = (MSIX_ENABLE | MSIX_FUNCTION_MASK) >> 8;
    this.#cfg = cfg;
    this.capOffset = cfg.addCapability(PCI_CAP_ID_MSIX, body, writable);
    if (fresh) this.#last[0] = this.control;
    cfg.addWriteHook((off, size) => {
      if (off < this.capOffset + 4 && off + size > this.capOffset + 2) this.#controlWritten();
    });
  }

  /** Message Control register. */
  get control(): number {
    const b = this.#cfg.bytes;
    return b[this.capOffset + 2] | (b[this.capOffset + 3] << 8);
  }
  get enabled(): boolean {
    return (this.control & MSIX_ENABLE) !== 0;
  }
  get functionMasked(): boolean {
    return (this.control & MSIX_FUNCTION_MASK) !== 0;
  }

  /** Whether vector v can be delivered now. */
  isMasked(v: number): boolean {
    const c = this.control;
    return !(c & MSIX_ENABLE) || (c & MSIX_FUNCTION_MASK) !== 0 ||
      (this.#table.getUint32(v * 16 + 12, true) & 1) !== 0;
  }

  vector(v: number): MsixVector {
    const t = this.#table;
    return {
      addressLo: t.getUint32(v * 16, true),
      addressHi: t.getUint32(v * 16 + 4, true),
      data: t.getUint32(v * 16 + 8, true),
      masked: this.isMasked(v),
    };
  }

  isPending(v: number): boolean {
    return (this.#pba[v >> 3] & (1 << (v & 7))) !== 0;
  }

  /**
   * Device side: raise vector v. Returns true when the caller should signal it (irqfd); when the
   * vector is masked the pending bit is set instead and false is returned.
   */
  trigger(v: number): boolean {
    if (v < 0 || v >= this.vectors) return false;
    if (this.isMasked(v)) {
      this.#pba[v >> 3] |= 1 << (v & 7);
      return false;
    }
    return true;
  }

  /** Guest read of the table (offset relative to the table start). */
  tableRead(offset: number, data: Uint8Array): void {
    for (let i = 0; i < data.length; i++) {
      const o = offset + i;
      data[i] = o >= 0 && o < this.tableSize ? this.#tableBytes[o] : 0;
    }
  }

  /** Guest write of the table (4- or 8-byte accesses; vector control bits 31:1 are reserved). */
  tableWrite(offset: number, data: Uint8Array): void {
    if (offset < 0 || offset + data.length > this.tableSize) return;
    const first = Math.floor(offset / 16);
    const last = Math.floor((offset + data.length - 1) / 16);
    for (let v = first; v <= last; v++) {
      const wasMasked = this.isMasked(v);
      this.#scratch.set(this.#tableBytes.subarray(v * 16, v * 16 + 16));
      const lo = Math.max(offset, v * 16);
      const hi = Math.min(offset + data.length, v * 16 + 16);
      this.#tableBytes.set(data.subarray(lo - offset, hi - offset), lo);
      // only the mask bit of vector control is writable
      const ctl = this.#table.getUint32(v * 16 + 12, true);
      this.#table.setUint32(v * 16 + 12, ctl & 1, true);
      let changed = false;
      for (let i = 0; i < 16; i++) if (this.#scratch[i] !== this.#tableBytes[v * 16 + i]) changed = true;
      if (changed) this.#vectorChanged(v, wasMasked);
    }
  }

  /** Guest read of the PBA (offset relative to the PBA start); writes to the PBA are ignored. */
  pbaRead(offset: number, data: Uint8Array): void {
    for (let i = 0; i < data.length; i++) {
      const o = offset + i;
      data[i] = o >= 0 && o < this.pbaSize ? this.#pba[o] : 0;
    }
  }

  #vectorChanged(v: number, wasMasked: boolean): void {
    const now = this.vector(v);
    this.onVectorChange?.(v, now);
    if (wasMasked && !now.masked && this.isPending(v)) {
      this.#pba[v >> 3] &= ~(1 << (v & 7));
      this.onDeliverPending?.(v);
    }
  }

  #controlWritten(): void {
    const old = this.#last[0];
    const now = this.control;
    this.#last[0] = now;
    if (((old ^ now) & (MSIX_ENABLE | MSIX_FUNCTION_MASK)) === 0) return;
    const oldOpen = (old & MSIX_ENABLE) !== 0 && !(old & MSIX_FUNCTION_MASK);
    for (let v = 0; v < this.vectors; v++) {
      const entryMasked = (this.#table.getUint32(v * 16 + 12, true) & 1) !== 0;
      this.#vectorChanged(v, !oldOpen || entryMasked);
    }
  }
}
