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

/** VM-level requests a device can make (guest poweroff or reset). */
export interface VmEventSink {
  request(e: "poweroff" | "reboot"): void;
}

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

const SPINS = 200;
const UNLOCKED = 0;
const LOCKED = 1;
const CONTENDED = 2;

/**
 * A mutex in one Int32 slot of a shared buffer: compare-and-swap fast path, a short spin, then
 * Atomics.wait (or pure spinning in a thread that may not block). Critical sections are expected to
 * last microseconds. Not re-entrant.
 *
 * States: 0 free, 1 held, 2 held with possible waiters (the unlocker then notifies).
 */
export class SharedLock {
  constructor(readonly i32: Int32Array, readonly index: number) {}

  lock(): void {
    const a = this.i32;
    const i = this.index;
    let c = Atomics.compareExchange(a, i, UNLOCKED, LOCKED);
    if (c === UNLOCKED) return;
    for (let n = 0; n < SPINS; n++) {
      if (Atomics.load(a, i) === UNLOCKED) {
        c = Atomics.compareExchange(a, i, UNLOCKED, LOCKED);
        if (c === UNLOCKED) return;
      }
    }
    // Mark contended; whoever releases will wake one waiter.
    c = Atomics.exchange(a, i, CONTENDED);
    while (c !== UNLOCKED) {
      if (canWait) Atomics.wait(a, i, CONTENDED, 10);
      c = Atomics.exchange(a, i, CONTENDED);
    }
  }

  /** Takes the lock if it is free; never waits. */
  tryLock(): boolean {
    return Atomics.compareExchange(this.i32, this.index, UNLOCKED, LOCKED) === UNLOCKED;
  }

  unlock(): void {
    const a = this.i32;
    const i = this.index;
    if (Atomics.exchange(a, i, UNLOCKED) === CONTENDED) Atomics.notify(a, i, 1);
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
