/**
 * PCI segment 0, bus 0: a host bridge at 00:00.0 plus endpoint functions in slots 1..31, reachable
 * through the legacy configuration mechanism #1 (ports 0xCF8 CONFIG_ADDRESS / 0xCFC..0xCFF
 * CONFIG_DATA) and through an ECAM MMIO window (offset = bus << 20 | dev << 15 | fn << 12 | reg).
 * BARs are placed from a 32-bit and a 64-bit MMIO window (and an optional I/O port window) when a
 * function is added; guest reprogramming is reported through {@link PciBus.onBarChange}.
 *
 * Like the functions, the bus keeps its one guest-visible register (CONFIG_ADDRESS) in a
 * SharedArrayBuffer so every vCPU worker can build the same bus over the same state.
 */

import { type BarSpec, PciConfigSpace } from "./config.ts";

/** Something living at a bus/device/function: a config space (with its own hooks). */
export interface PciFunction {
  readonly config: PciConfigSpace;
}

export interface Window {
  base: number;
  size: number;
}

export interface PciBusParams {
  /** 32-bit MMIO window for mem32 BARs (and mem64 BARs when mmio64 is absent). */
  mmio32: Window;
  /** 64-bit MMIO window for mem64 BARs. */
  mmio64?: Window;
  /** Port window for io BARs. */
  io?: Window;
  /** Host bridge ids; default a generic PCIe host bridge (1b36:0008), class 06:00:00. */
  hostBridge?: { vendorId: number; deviceId: number };
  /** Shared state from another instance (see module doc). */
  state?: SharedArrayBuffer;
}

/** bus, device, function as the lead sees them. */
export interface PciAddress {
  bus: number;
  device: number;
  function: number;
}

export type PciBarChange = (
  addr: PciAddress,
  fn: PciFunction,
  bar: number,
  oldAddr: number,
  newAddr: number,
  spec: BarSpec,
) => void;

export const PCI_CONFIG_ADDRESS_PORT = 0xcf8;
/** Length of the port range to register at 0xCF8 (CONFIG_ADDRESS + CONFIG_DATA). */
export const PCI_CONFIG_IO_LEN = 8;
export const ECAM_BUS_SIZE = 1 << 20;

/** A PciFunction that only has a config space (host bridge, tests). */
export class PlainPciFunction implements PciFunction {
  constructor(readonly config: PciConfigSpace) {}
}

export class PciBus {
  readonly state: SharedArrayBuffer;
  /** Functions by slot (device number), function 0 only. */
  readonly slots: (PciFunction | undefined)[] = new Array(32);
  /** Guest (re)programmed a BAR or toggled decoding; -1 means "not decoded". */
  onBarChange: PciBarChange | null = null;
  /** Byte write to port 0xCF9 (reset control register) with the value written. */
  onResetControl: ((value: number) => void) | null = null;
  readonly #addr: Uint32Array;
  readonly #alloc: { mmio32: number; mmio64: number; io: number };
  /** BAR ranges given back by removed functions, reused before the window's untouched end. */
  readonly #freed: { key: "mmio32" | "mmio64" | "io"; at: number; size: number }[] = [];
  readonly #params: PciBusParams;

  constructor(params: PciBusParams) {
    this.#params = params;
    this.state = params.state ?? new SharedArrayBuffer(8);
    this.#addr = new Uint32Array(this.state, 0, 1);
    this.#alloc = { mmio32: params.mmio32.base, mmio64: params.mmio64?.base ?? 0, io: params.io?.base ?? 0 };
  }

  /** Builds the host bridge config (call first, in every thread, with the same shared state). */
  static hostBridge(params: PciBusParams, state?: SharedArrayBuffer): PlainPciFunction {
    const id = params.hostBridge ?? { vendorId: 0x1b36, deviceId: 0x0008 };
    return new PlainPciFunction(new PciConfigSpace({ ...id, classCode: 0x060000 }, state));
  }

  /**
   * Puts a function in a slot (0 = host bridge) and, when `allocate` is true, places its BARs.
   * Returns the BAR addresses by index. In secondary threads pass allocate=false (state is shared).
   */
  add(slot: number, fn: PciFunction, allocate = true): Map<number, number> {
    if (slot < 0 || slot > 31 || this.slots[slot]) throw new Error(`PCI slot ${slot} unavailable`);
    this.slots[slot] = fn;
    const out = new Map<number, number>();
    const cfg = fn.config;
    const addr = { bus: 0, device: slot, function: 0 };
    cfg.onBarChange = (bar, o, n, spec) => this.onBarChange?.(addr, fn, bar, o, n, spec);
    for (let i = 0; i < 6; i++) {
      const spec = cfg.bars[i];
      if (!spec || spec.index !== i) continue;
      // io BARs stay unassigned (0) without an io window; the guest may assign them
      if (allocate && (spec.kind !== "io" || this.#params.io)) cfg.programBar(i, this.#allocate(spec));
      out.set(i, cfg.barAddress(i));
    }
    return out;
  }

  /**
   * Takes the function out of `slot` (hot removal) and returns it. When `release` is true (the thread that
   * allocates), its BAR ranges go back to the allocator for later functions.
   */
  remove(slot: number, release = true): PciFunction | undefined {
    const fn = this.slots[slot];
    if (slot < 1 || slot > 31 || !fn) return undefined;
    this.slots[slot] = undefined;
    fn.config.onBarChange = null;
    if (release) {
      for (let i = 0; i < 6; i++) {
        const spec = fn.config.bars[i];
        if (!spec || spec.index !== i || (spec.kind === "io" && !this.#params.io)) continue;
        const key = spec.kind === "io"
          ? "io"
          : spec.kind === "mem64" && this.#params.mmio64
          ? "mmio64"
          : "mmio32";
        const at = fn.config.barAddress(i);
        if (at > 0) this.#freed.push({ key, at, size: spec.size });
      }
    }
    return fn;
  }

  /** First free slot from 1. */
  freeSlot(): number {
    for (let s = 1; s < 32; s++) if (!this.slots[s]) return s;
    throw new Error("PCI bus full");
  }

  #allocate(spec: BarSpec): number {
    const p = this.#params;
    let key: "mmio32" | "mmio64" | "io";
    let win: Window | undefined;
    if (spec.kind === "io") [key, win] = ["io", p.io];
    else if (spec.kind === "mem64" && p.mmio64) [key, win] = ["mmio64", p.mmio64];
    else [key, win] = ["mmio32", p.mmio32];
    if (!win) throw new Error(`no window for ${spec.kind} BAR`);
    const reuse = this.#freed.findIndex((f) => f.key === key && f.size === spec.size);
    if (reuse >= 0) return this.#freed.splice(reuse, 1)[0].at;
    const at = Math.ceil(this.#alloc[key] / spec.size) * spec.size;
    if (at + spec.size > win.base + win.size) throw new Error(`PCI ${key} window exhausted`);
    this.#alloc[key] = at + spec.size;
    return at;
  }

  #fn(bus: number, dev: number, fn: number): PciFunction | undefined {
    return bus === 0 && fn === 0 ? this.slots[dev] : undefined;
  }

  /** Config read through (bus, dev, fn, byte offset); absent functions read as all-ones. */
  configRead(bus: number, dev: number, fn: number, reg: number, size: number): number {
    const f = this.#fn(bus, dev, fn);
    if (!f) return size === 4 ? 0xffffffff : (1 << (8 * size)) - 1;
    return f.config.read(reg, size);
  }

  configWrite(bus: number, dev: number, fn: number, reg: number, size: number, value: number): void {
    this.#fn(bus, dev, fn)?.config.write(reg, size, value);
  }

  // ---- mechanism #1: register this object as a PioDevice at 0xCF8, length 8 ----

  pioRead(offset: number, size: number): number {
    if (offset < 4) {
      return offset === 0 && size === 4 ? this.#addr[0] : (size === 4 ? 0xffffffff : (1 << (8 * size)) - 1);
    }
    const a = this.#addr[0];
    if (!(a & 0x80000000)) return size === 4 ? 0xffffffff : (1 << (8 * size)) - 1;
    const reg = (a & 0xfc) + (offset - 4);
    return this.configRead((a >>> 16) & 0xff, (a >>> 11) & 0x1f, (a >>> 8) & 7, reg, size);
  }

  pioWrite(offset: number, size: number, value: number): void {
    if (offset < 4) {
      if (offset === 0 && size === 4) this.#addr[0] = (value & 0x80fffffc) >>> 0;
      else if (offset === 1 && size === 1) this.onResetControl?.(value & 0xff);
      return;
    }
    const a = this.#addr[0];
    if (!(a & 0x80000000)) return;
    const reg = (a & 0xfc) + (offset - 4);
    this.configWrite((a >>> 16) & 0xff, (a >>> 11) & 0x1f, (a >>> 8) & 7, reg, size, value);
  }

  // ---- ECAM: register this object as an MmioDevice over the ECAM window (bus 0 needs 1 MiB) ----

  mmioRead(offset: number, data: Uint8Array): void {
    const size = data.length;
    let v: number;
    if (size === 1 || size === 2 || size === 4) {
      v = this.configRead(offset >>> 20, (offset >>> 15) & 0x1f, (offset >>> 12) & 7, offset & 0xfff, size);
    } else if (size === 8) {
      // split qword accesses into two dwords
      const lo = new Uint8Array(4);
      const hi = new Uint8Array(4);
      this.mmioRead(offset, lo);
      this.mmioRead(offset + 4, hi);
      data.set(lo);
      data.set(hi, 4);
      return;
    } else {
      data.fill(0xff);
      return;
    }
    for (let i = 0; i < size; i++) data[i] = (v >>> (8 * i)) & 0xff;
  }

  mmioWrite(offset: number, data: Uint8Array): void {
    const size = data.length;
    if (size === 8) {
      this.mmioWrite(offset, data.subarray(0, 4));
      this.mmioWrite(offset + 4, data.subarray(4));
      return;
    }
    if (size !== 1 && size !== 2 && size !== 4) return;
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + data[i];
    this.configWrite(offset >>> 20, (offset >>> 15) & 0x1f, (offset >>> 12) & 7, offset & 0xfff, size, v);
  }
}
