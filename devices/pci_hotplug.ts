/**
 * The PCI hotplug controller the DSDT's hotplug methods talk to (ACPI PCI hotplug, the guest's
 * `acpiphp`). One block of four 32-bit I/O registers per PCI segment, at `base + 16 * segment`:
 *
 * - +0 PCIU (read): slots where a device arrived since the last read (bit N = slot N); reading clears.
 * - +4 PCID (read): slots whose device the VMM asks the guest to eject; reading clears.
 * - +8 B0EJ (write): the guest's `_EJ0` for a slot: it has let go of the device in each slot whose bit is
 *   set; the VMM may now take it away.
 * - +12 reserved (reads 0).
 *
 * The main thread marks arrivals and eject requests (`plug`, `requestEject`) and then raises the GED
 * event that makes the guest read them; it waits for the guest's `_EJ0` with `waitEjected`. State is a
 * SharedArrayBuffer, so every vCPU thread builds the same device over it. No per-access allocation.
 */

/** Bytes of I/O space per segment. */
export const HOTPLUG_SEGMENT_STRIDE = 16;
/** Register offsets within a segment's block. */
export const HOTPLUG_REG = { PCIU: 0, PCID: 4, B0EJ: 8 } as const;

// Int32 words: [0] eject sequence (bumped on every B0EJ write), then per segment: up, down, ejected.
const SEQ = 0;
const PER_SEGMENT = 3;
const UP = 0;
const DOWN = 1;
const EJECTED = 2;

/** Structured-cloneable description of the controller. */
export interface PciHotplugDescriptor {
  /** First I/O port of the block. */
  base: number;
  segments: number;
  state: SharedArrayBuffer;
}

/** The controller over its shared state; constructible in any thread. */
export class PciHotplug {
  /** A new controller's descriptor for `segments` PCI segments at I/O port `base`. */
  static createDescriptor(base: number, segments: number): PciHotplugDescriptor {
    if (segments < 1 || base + segments * HOTPLUG_SEGMENT_STRIDE > 0x10000) {
      throw new RangeError(`pci hotplug: ${segments} segment(s) do not fit at port 0x${base.toString(16)}`);
    }
    return { base, segments, state: new SharedArrayBuffer(4 * (1 + PER_SEGMENT * segments)) };
  }

  readonly #w: Int32Array;
  readonly base: number;
  readonly len: number;
  readonly segments: number;

  constructor(d: PciHotplugDescriptor) {
    this.#w = new Int32Array(d.state);
    if (this.#w.length < 1 + PER_SEGMENT * d.segments) throw new RangeError("pci hotplug: state too small");
    this.base = d.base;
    this.segments = d.segments;
    this.len = d.segments * HOTPLUG_SEGMENT_STRIDE;
  }

  #word(segment: number, which: number): number {
    return 1 + PER_SEGMENT * segment + which;
  }

  #check(segment: number, slot: number): void {
    if (segment < 0 || segment >= this.segments || slot < 1 || slot > 31) {
      throw new RangeError(`pci hotplug: no slot ${segment}:${slot}`);
    }
  }

  // ---- guest side: a PioDevice over `len` ports from `base` ----

  pioRead(offset: number, size: number): number {
    const segment = Math.floor(offset / HOTPLUG_SEGMENT_STRIDE);
    const reg = offset % HOTPLUG_SEGMENT_STRIDE;
    if (size !== 4 || segment >= this.segments) return 0;
    if (reg === HOTPLUG_REG.PCIU) return Atomics.exchange(this.#w, this.#word(segment, UP), 0) >>> 0;
    if (reg === HOTPLUG_REG.PCID) return Atomics.exchange(this.#w, this.#word(segment, DOWN), 0) >>> 0;
    return 0;
  }

  pioWrite(offset: number, size: number, value: number): void {
    const segment = Math.floor(offset / HOTPLUG_SEGMENT_STRIDE);
    const reg = offset % HOTPLUG_SEGMENT_STRIDE;
    if (size !== 4 || segment >= this.segments || reg !== HOTPLUG_REG.B0EJ) return;
    const bits = value & ~1; // slot 0 is the host bridge
    if (bits === 0) return;
    Atomics.or(this.#w, this.#word(segment, EJECTED), bits);
    Atomics.add(this.#w, SEQ, 1);
    Atomics.notify(this.#w, SEQ);
  }

  // ---- VMM side ----

  /** A device is in `slot` of `segment`: the guest's next scan brings it up. */
  plug(segment: number, slot: number): void {
    this.#check(segment, slot);
    Atomics.and(this.#w, this.#word(segment, EJECTED), ~(1 << slot));
    Atomics.or(this.#w, this.#word(segment, UP), 1 << slot);
  }

  /** Asks the guest to let go of the device in `slot` (its next scan sends the eject request). */
  requestEject(segment: number, slot: number): void {
    this.#check(segment, slot);
    Atomics.and(this.#w, this.#word(segment, UP), ~(1 << slot));
    Atomics.or(this.#w, this.#word(segment, DOWN), 1 << slot);
  }

  /** Whether the guest has ejected `slot` (and clears that mark when it has). */
  takeEjected(segment: number, slot: number): boolean {
    this.#check(segment, slot);
    const bit = 1 << slot;
    return (Atomics.and(this.#w, this.#word(segment, EJECTED), ~bit) & bit) !== 0;
  }

  /**
   * Waits (without blocking the thread) until the guest ejects `slot`, at most `timeoutMs`. Returns
   * whether it did; the eject request is withdrawn when it did not.
   */
  async waitEjected(segment: number, slot: number, timeoutMs: number): Promise<boolean> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const seq = Atomics.load(this.#w, SEQ);
      if (this.takeEjected(segment, slot)) return true;
      const left = deadline - performance.now();
      if (left <= 0) {
        Atomics.and(this.#w, this.#word(segment, DOWN), ~(1 << slot));
        return false;
      }
      const w = Atomics.waitAsync(this.#w, SEQ, seq, Math.min(left, 1000));
      if (w.async) await w.value;
    }
  }
}
