/**
 * The ACPI memory hotplug controller: the hotplug region is cut into equal slots, each a memory device in
 * the DSDT with a fixed range. One 8-bit I/O register per slot, at `base + slot`:
 *
 * - read: bit 0 the slot's memory is plugged, bit 1 it was just plugged (the guest should add it).
 * - write: bit 1 acknowledges the addition.
 *
 * The main thread maps the memory, gives it to KVM, then marks the slot (`plug`) and raises the GED event
 * that makes the guest scan. Plugged memory stays until the VM ends (ACPI memory is not taken back, as in
 * Cloud Hypervisor). No allocation per access.
 */

export const MEM_PRESENT = 0x01;
export const MEM_INSERTING = 0x02;

/** Structured-cloneable description of the controller. */
export interface MemoryHotplugDescriptor {
  base: number;
  slots: number;
  state: SharedArrayBuffer;
}

export class MemoryHotplug {
  static createDescriptor(base: number, slots: number): MemoryHotplugDescriptor {
    if (slots < 1 || slots > 256) throw new RangeError(`memory hotplug: ${slots} slots`);
    return { base, slots, state: new SharedArrayBuffer(4 * slots) };
  }

  readonly #w: Int32Array;
  readonly base: number;
  readonly len: number;

  constructor(d: MemoryHotplugDescriptor) {
    this.#w = new Int32Array(d.state);
    this.base = d.base;
    this.len = d.slots;
  }

  pioRead(offset: number, _size: number): number {
    return offset < this.len ? Atomics.load(this.#w, offset) & 0xff : 0;
  }

  pioWrite(offset: number, _size: number, value: number): void {
    if (offset < this.len && value & MEM_INSERTING) Atomics.and(this.#w, offset, ~MEM_INSERTING);
  }

  /** Slot `slot` holds memory now: the guest's next scan adds it. */
  plug(slot: number): void {
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.len) {
      throw new RangeError(`no memory slot ${slot}`);
    }
    Atomics.store(this.#w, slot, MEM_PRESENT | MEM_INSERTING);
  }

  /** Slots plugged so far. */
  plugged(): number {
    let n = 0;
    for (let i = 0; i < this.len; i++) if (Atomics.load(this.#w, i) & MEM_PRESENT) n++;
    return n;
  }
}
