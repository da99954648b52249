/**
 * The vCPU hotplug controller the DSDT's processor objects talk to (ACPI CPU hotplug). One 8-bit I/O
 * register per possible vCPU, at `base + id`:
 *
 * - read: bit 0 the vCPU is present (enabled), bit 1 it was just added (the guest should bring it up),
 *   bit 2 the VMM asks the guest to give it up.
 * - write: bit 1 acknowledges the addition, bit 2 acknowledges the removal request, bit 3 is the guest's
 *   `_EJ0`: it has taken the vCPU offline and lets the VMM stop it.
 *
 * The main thread marks additions and removal requests (`plug`, `requestEject`), raises the GED event that
 * makes the guest scan, and waits for `_EJ0` with `waitEjected`. The state is a SharedArrayBuffer, so every
 * vCPU thread builds the same device over it. No allocation per access.
 */

export const CPU_PRESENT = 0x01;
export const CPU_INSERTING = 0x02;
export const CPU_REMOVING = 0x04;
/** Write-only: the guest's _EJ0. */
export const CPU_EJECT = 0x08;

/** Structured-cloneable description of the controller. */
export interface CpuHotplugDescriptor {
  base: number;
  /** Possible vCPUs (max_vcpus): one register each. */
  count: number;
  /** Int32 words: [0] eject sequence, then per vCPU: flags, ejected. */
  state: SharedArrayBuffer;
}

const SEQ = 0;

export class CpuHotplug {
  /** A controller for `count` possible vCPUs, `present` of them present from boot. */
  static createDescriptor(base: number, count: number, present: number): CpuHotplugDescriptor {
    if (count < 1 || count > 255 || present > count) {
      throw new RangeError(`cpu hotplug: ${present}/${count} vCPUs`);
    }
    const state = new SharedArrayBuffer(4 * (1 + 2 * count));
    const w = new Int32Array(state);
    for (let i = 0; i < present; i++) w[1 + 2 * i] = CPU_PRESENT;
    return { base, count, state };
  }

  readonly #w: Int32Array;
  readonly base: number;
  readonly len: number;

  constructor(d: CpuHotplugDescriptor) {
    this.#w = new Int32Array(d.state);
    this.base = d.base;
    this.len = d.count;
  }

  #check(id: number): void {
    if (!Number.isInteger(id) || id < 0 || id >= this.len) throw new RangeError(`cpu hotplug: no vCPU ${id}`);
  }

  // ---- guest side: a PioDevice over `len` ports from `base` ----

  pioRead(offset: number, _size: number): number {
    if (offset >= this.len) return 0;
    return Atomics.load(this.#w, 1 + 2 * offset) & 0xff;
  }

  pioWrite(offset: number, _size: number, value: number): void {
    if (offset >= this.len) return;
    const at = 1 + 2 * offset;
    if (value & CPU_INSERTING) Atomics.and(this.#w, at, ~CPU_INSERTING);
    if (value & CPU_REMOVING) Atomics.and(this.#w, at, ~CPU_REMOVING);
    if (value & CPU_EJECT) {
      Atomics.and(this.#w, at, ~(CPU_PRESENT | CPU_REMOVING | CPU_INSERTING));
      Atomics.store(this.#w, at + 1, 1);
      Atomics.add(this.#w, SEQ, 1);
      Atomics.notify(this.#w, SEQ);
    }
  }

  // ---- VMM side ----

  /** Whether vCPU `id` is present. */
  present(id: number): boolean {
    this.#check(id);
    return (Atomics.load(this.#w, 1 + 2 * id) & CPU_PRESENT) !== 0;
  }

  /** vCPU `id` exists now: the guest's next scan adds it. */
  plug(id: number): void {
    this.#check(id);
    Atomics.store(this.#w, 2 + 2 * id, 0);
    Atomics.store(this.#w, 1 + 2 * id, CPU_PRESENT | CPU_INSERTING);
  }

  /** Asks the guest to give vCPU `id` up (its next scan sends the eject request). */
  requestEject(id: number): void {
    this.#check(id);
    Atomics.and(this.#w, 1 + 2 * id, ~CPU_INSERTING);
    Atomics.or(this.#w, 1 + 2 * id, CPU_REMOVING);
  }

  /** Waits (without blocking the thread) for the guest's _EJ0 of vCPU `id`, at most `timeoutMs`. */
  async waitEjected(id: number, timeoutMs: number): Promise<boolean> {
    this.#check(id);
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const seq = Atomics.load(this.#w, SEQ);
      if (Atomics.exchange(this.#w, 2 + 2 * id, 0) === 1) return true;
      const left = deadline - performance.now();
      if (left <= 0) {
        Atomics.and(this.#w, 1 + 2 * id, ~CPU_REMOVING);
        return false;
      }
      const w = Atomics.waitAsync(this.#w, SEQ, seq, Math.min(left, 1000));
      if (w.async) await w.value;
    }
  }
}
