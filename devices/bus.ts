/**
 * The port-I/O and MMIO buses a vCPU exit is dispatched through.
 *
 * A device is registered on a half-open range [base, base + len); it sees offsets relative to `base`.
 * Ranges may not overlap. Reads nobody claims return all-ones (what a PC's floating bus gives), writes
 * nobody claims are dropped; both are counted. Dispatch allocates nothing.
 *
 * A bus is a per-thread object (each vCPU worker builds its own over shared device state); its
 * counters are per thread too.
 */

/** A device on the port-I/O bus. `size` is 1, 2 or 4; values are unsigned. */
export interface PioDevice {
  pioRead(offset: number, size: number): number;
  pioWrite(offset: number, size: number, value: number): void;
}

/** A device on the MMIO bus. `data.length` is the access size; reads fill `data`. */
export interface MmioDevice {
  mmioRead(offset: number, data: Uint8Array): void;
  mmioWrite(offset: number, data: Uint8Array): void;
}

/** Thrown when a registration overlaps an existing range or is malformed. */
export class BusError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "BusError";
  }
}

const PORTS = 0x10000;

function hex(n: number): string {
  return "0x" + n.toString(16);
}

function ones(size: number): number {
  return size >= 4 ? 0xffffffff : (1 << (size * 8)) - 1;
}

interface PioSlot {
  base: number;
  len: number;
  dev: PioDevice;
  name: string;
}

/**
 * The 64K I/O port space, with a direct port → slot table (one Uint16Array of 128 KiB).
 * An access is dispatched when its first and last byte fall in the same registered range.
 */
export class PioBus {
  readonly #table = new Uint16Array(PORTS); // slot index + 1, 0 = nothing
  readonly #slots: PioSlot[] = [];
  /** Reads that no device claimed. */
  unhandledReads = 0;
  /** Writes that no device claimed. */
  unhandledWrites = 0;
  /** Port of the most recent unhandled access (diagnostics), -1 before any. */
  lastUnhandledPort = -1;

  register(base: number, len: number, dev: PioDevice, name = "device"): void {
    if (!Number.isInteger(base) || !Number.isInteger(len) || len <= 0 || base < 0 || base + len > PORTS) {
      throw new BusError(`pio: bad range ${hex(base)}+${len} for ${name}`);
    }
    for (let p = base; p < base + len; p++) {
      const s = this.#table[p];
      if (s !== 0) {
        const o = this.#slots[s - 1];
        throw new BusError(
          `pio: ${name} at [${hex(base)}, ${hex(base + len)}) overlaps ${o.name} at [${hex(o.base)}, ${
            hex(o.base + o.len)
          })`,
        );
      }
    }
    // Reuse a freed slot if any, so the Uint16 index never runs out.
    let idx = this.#slots.findIndex((s) => s.len === 0);
    if (idx < 0) {
      idx = this.#slots.length;
      if (idx >= 0xffff) throw new BusError("pio: too many devices");
      this.#slots.push({ base, len, dev, name });
    } else {
      this.#slots[idx] = { base, len, dev, name };
    }
    this.#table.fill(idx + 1, base, base + len);
  }

  /** Removes the range registered at exactly `base`; returns whether there was one. */
  unregister(base: number): boolean {
    const s = base >= 0 && base < PORTS ? this.#table[base] : 0;
    if (s === 0) return false;
    const slot = this.#slots[s - 1];
    if (slot.base !== base) return false;
    this.#table.fill(0, slot.base, slot.base + slot.len);
    slot.len = 0;
    return true;
  }

  /** The device registered on `port`, if any (diagnostics, tests). */
  deviceAt(port: number): { base: number; len: number; dev: PioDevice; name: string } | undefined {
    const s = port >= 0 && port < PORTS ? this.#table[port] : 0;
    return s === 0 ? undefined : this.#slots[s - 1];
  }

  read(port: number, size: number): number {
    const s = this.#table[port & 0xffff];
    if (s !== 0) {
      const slot = this.#slots[s - 1];
      const off = port - slot.base;
      if (off + size <= slot.len) return slot.dev.pioRead(off, size);
    }
    this.unhandledReads++;
    this.lastUnhandledPort = port;
    return ones(size);
  }

  write(port: number, size: number, value: number): void {
    const s = this.#table[port & 0xffff];
    if (s !== 0) {
      const slot = this.#slots[s - 1];
      const off = port - slot.base;
      if (off + size <= slot.len) {
        slot.dev.pioWrite(off, size, value);
        return;
      }
    }
    this.unhandledWrites++;
    this.lastUnhandledPort = port;
  }
}

interface MmioSlot {
  base: number;
  end: number; // exclusive
  dev: MmioDevice;
  name: string;
}

/**
 * The guest-physical MMIO space: ranges sorted by base, found by binary search (with a one-entry
 * cache for the common case of repeated accesses to the same device). Addresses are JS numbers
 * (exact up to 2^53).
 */
export class MmioBus {
  #slots: MmioSlot[] = [];
  #last: MmioSlot | null = null;
  /** Reads that no device claimed. */
  unhandledReads = 0;
  /** Writes that no device claimed. */
  unhandledWrites = 0;
  /** Address of the most recent unhandled access (diagnostics), -1 before any. */
  lastUnhandledAddr = -1;

  register(base: number, len: number, dev: MmioDevice, name = "device"): void {
    if (!Number.isSafeInteger(base) || !Number.isSafeInteger(len) || len <= 0 || base < 0) {
      throw new BusError(`mmio: bad range ${hex(base)}+${len} for ${name}`);
    }
    const end = base + len;
    if (!Number.isSafeInteger(end)) throw new BusError(`mmio: range of ${name} ends beyond 2^53`);
    for (const o of this.#slots) {
      if (base < o.end && o.base < end) {
        throw new BusError(
          `mmio: ${name} at [${hex(base)}, ${hex(end)}) overlaps ${o.name} at [${hex(o.base)}, ${
            hex(o.end)
          })`,
        );
      }
    }
    const slots = [...this.#slots, { base, end, dev, name }];
    slots.sort((a, b) => a.base - b.base);
    this.#slots = slots;
    this.#last = null;
  }

  /** Removes the range registered at exactly `base`; returns whether there was one. */
  unregister(base: number): boolean {
    const i = this.#slots.findIndex((s) => s.base === base);
    if (i < 0) return false;
    this.#slots = this.#slots.filter((_, j) => j !== i);
    this.#last = null;
    return true;
  }

  /** The device covering `addr`, if any (diagnostics, tests). */
  deviceAt(addr: number): { base: number; len: number; dev: MmioDevice; name: string } | undefined {
    const s = this.#find(addr);
    return s ? { base: s.base, len: s.end - s.base, dev: s.dev, name: s.name } : undefined;
  }

  #find(addr: number): MmioSlot | null {
    const last = this.#last;
    if (last !== null && addr >= last.base && addr < last.end) return last;
    const slots = this.#slots;
    let lo = 0;
    let hi = slots.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const s = slots[mid];
      if (addr < s.base) hi = mid - 1;
      else if (addr >= s.end) lo = mid + 1;
      else {
        this.#last = s;
        return s;
      }
    }
    return null;
  }

  read(addr: number, data: Uint8Array): void {
    const s = this.#find(addr);
    if (s !== null && addr + data.length <= s.end) {
      s.dev.mmioRead(addr - s.base, data);
      return;
    }
    this.unhandledReads++;
    this.lastUnhandledAddr = addr;
    data.fill(0xff);
  }

  write(addr: number, data: Uint8Array): void {
    const s = this.#find(addr);
    if (s !== null && addr + data.length <= s.end) {
      s.dev.mmioWrite(addr - s.base, data);
      return;
    }
    this.unhandledWrites++;
    this.lastUnhandledAddr = addr;
  }
}
