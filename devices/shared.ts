/**
 * Shared device state: the pieces every device reachable from a vCPU exit is built from.
 *
 * A device's registers live in a SharedArrayBuffer. Each thread that needs the device (every vCPU
 * worker, and the main thread for host-side input) constructs the same device class over the same
 * buffer from a structured-cloneable descriptor. Register accesses take a {@link SharedLock} stored
 * in the buffer itself, so the state machine runs in one thread at a time; plain typed-array reads and
 * writes inside the critical section are ordered by the lock's Atomics operations.
 *
 * Side effects leave the device through the small sink interfaces below, whose implementations must
 * work from any thread (KVM_IRQ_LINE / irqfd for interrupts, a raw fd write for output, a shared event
 * word for VM-level requests).
 */

/** An interrupt line driven by a device. `set` reports the line's level; it is called on changes only. */
export interface IrqLine {
  set(level: boolean): void;
  /** An edge (assert then deassert), for sources that are edge-triggered by nature. */
  pulse?(): void;
}

/**
 * Where device output goes. `write` is called with the device lock held, in output order; it must
 * consume the bytes before returning (the array is reused by the caller and must not be retained).
 */
export interface ByteSink {
  write(bytes: Uint8Array): void;
}

/** VM-level requests a device can make (guest poweroff or reset); `by` names the register the guest used. */
export interface VmEventSink {
  request(e: "poweroff" | "reboot", by: EventSource): void;
}

/**
 * What made the guest power off or reset, as the VMM reports it (the log line "guest event: reboot (...)").
 * An unexpected reset of a test guest is then told apart: a guest panic with panic=-1 (keyboard controller
 * or ACPI reset register), a triple fault, or a reset KVM itself asked for.
 */
export const EventSource = {
  Unknown: 0,
  TripleFault: 1,
  KvmSystemEvent: 2,
  KeyboardController: 3,
  AcpiResetRegister: 4,
  PciResetControl: 5,
  AcpiSleepControl: 6,
} as const;
export type EventSource = typeof EventSource[keyof typeof EventSource];

/** Words for each {@link EventSource}, for the log. */
export const EVENT_SOURCE_NAMES: readonly string[] = [
  "source unknown",
  "triple fault",
  "KVM system event",
  "keyboard controller reset line",
  "ACPI reset register",
  "PCI reset control register 0xCF9",
  "ACPI sleep control register",
];

/** Line, sink and event implementations that do nothing. */
export const nullIrq: IrqLine = { set() {} };
export const nullSink: ByteSink = { write() {} };
export const nullEvents: VmEventSink = { request() {} };

// The main thread of some runtimes may not block in Atomics.wait; find out once per thread.
const canWait: boolean = (() => {
  try {
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 1, 0);
    return true;
  } catch {
    return false;
  }
})();

const SPINS = 100;
const NEXT = 0; // next ticket to hand out
const SERVING = 1; // ticket now holding the lock
const WAITERS = 2; // threads blocked in Atomics.wait

/**
 * A fair (ticket) mutex in three Int32 slots of a shared buffer: take a ticket, spin briefly until it
 * is served, then block in Atomics.wait (or keep spinning in a thread that may not block). Threads get
 * the lock in arrival order, so a thread that touches a device rarely (the main thread feeding serial
 * input) is never starved by vCPUs hammering it. Unlock notifies only when someone is blocked.
 * Critical sections are expected to last microseconds. Not re-entrant.
 */
export class SharedLock {
  /** Int32 slots a lock occupies. */
  static readonly WORDS = 3;

  /** A lock over `i32[index .. index + 3)`, which must start zeroed. */
  constructor(readonly i32: Int32Array, readonly index: number) {}

  lock(): void {
    const a = this.i32;
    const serving = this.index + SERVING;
    const ticket = Atomics.add(a, this.index + NEXT, 1);
    if (Atomics.load(a, serving) === ticket) return;
    for (let n = 0; n < SPINS; n++) if (Atomics.load(a, serving) === ticket) return;
    const waiters = this.index + WAITERS;
    Atomics.add(a, waiters, 1);
    let s: number;
    while ((s = Atomics.load(a, serving)) !== ticket) {
      if (canWait) Atomics.wait(a, serving, s, 50);
    }
    Atomics.sub(a, waiters, 1);
  }

  /** Takes the lock if it is free; never waits. */
  tryLock(): boolean {
    const a = this.i32;
    const s = Atomics.load(a, this.index + SERVING);
    return Atomics.compareExchange(a, this.index + NEXT, s, (s + 1) | 0) === s;
  }

  unlock(): void {
    const a = this.i32;
    Atomics.add(a, this.index + SERVING, 1);
    if (Atomics.load(a, this.index + WAITERS) !== 0) Atomics.notify(a, this.index + SERVING);
  }

  /** Whether some thread holds the lock (diagnostics). */
  get locked(): boolean {
    return Atomics.load(this.i32, this.index + NEXT) !== Atomics.load(this.i32, this.index + SERVING);
  }
}

/**
 * Lays out fields in a shared buffer: Int32 words (registers, counters, the lock), Float64 slots and
 * byte areas, in the order they are reserved. Offsets are byte offsets, aligned for their type.
 *
 * ```ts
 * const L = new SabLayout();
 * const REGS = L.words(8);      // byte offset of 8 Int32 words
 * const FIFO = L.bytes(16);     // byte offset of 16 bytes
 * const sab = new SharedArrayBuffer(L.byteLength);
 * ```
 */
export class SabLayout {
  #size = 0;

  /** Reserves `count` Int32 words; returns their byte offset. */
  words(count: number): number {
    this.#size = (this.#size + 3) & ~3;
    const off = this.#size;
    this.#size += count * 4;
    return off;
  }

  /** Reserves `count` Float64 slots (8-byte aligned); returns their byte offset. */
  f64(count: number): number {
    this.#size = (this.#size + 7) & ~7;
    const off = this.#size;
    this.#size += count * 8;
    return off;
  }

  /** Reserves `count` bytes; returns their byte offset. */
  bytes(count: number): number {
    const off = this.#size;
    this.#size += count;
    return off;
  }

  /** Size of the buffer, rounded up to 8 bytes. */
  get byteLength(): number {
    return (this.#size + 7) & ~7;
  }
}

/** Checks that a descriptor carries a shared buffer of at least `min` bytes. */
export function checkSab(sab: unknown, min: number, what: string): SharedArrayBuffer {
  if (!(sab instanceof SharedArrayBuffer)) {
    throw new TypeError(`${what}: descriptor has no SharedArrayBuffer`);
  }
  if (sab.byteLength < min) {
    throw new RangeError(`${what}: shared buffer is ${sab.byteLength} bytes, need ${min}`);
  }
  return sab;
}
