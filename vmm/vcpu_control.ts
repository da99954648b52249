/**
 * The shared-memory protocol between the main thread and a vCPU worker.
 *
 * One small SharedArrayBuffer per vCPU carries the requested command, the worker's state and its
 * pthread id (for the kick). The main thread asks by storing a command, setting `immediate_exit` in
 * kvm_run and signalling the thread; the worker checks the command between KVM_RUN calls. No
 * message is exchanged per exit.
 */

/** Command slots (Int32Array indices). */
export const CTL_CMD = 0;
export const CTL_STATE = 1;
/** Int32 slot holding the number of KVM_RUN exits handled (diagnostics, counters). */
export const CTL_EXITS = 2;
/** Int32 slot set to 1 once the pthread id has been published. */
export const CTL_READY = 3;
const CTL_INT32S = 8;
/** Int32 slot holding the worker thread's kernel tid. */
const CTL_TID = 4;
/** Int32 slot set to 1 when an NMI is to be injected before the vCPU next runs. */
const CTL_NMI = 5;
/** Int32 slot: the last PCI change (hot-add or removal) this vCPU's buses have taken in. */
const CTL_PCI_GEN = 6;

/** Commands the main thread gives a vCPU. */
export const Cmd = { Run: 0, Pause: 1, Stop: 2, Reload: 3 } as const;
/** States a vCPU reports. */
export const State = { Starting: 0, Running: 1, Paused: 2, Stopped: 3 } as const;

/** Events any thread can raise for the whole VM (guest poweroff, reboot request, crash). */
export const VmEvent = { None: 0, Poweroff: 1, Reboot: 2, Crash: 3 } as const;
export type VmEventCode = typeof VmEvent[keyof typeof VmEvent];

/** Views over one vCPU's control buffer; constructible in any thread from the buffer. */
export class VcpuControl {
  readonly i32: Int32Array;

  constructor(readonly sab: SharedArrayBuffer = new SharedArrayBuffer(CTL_INT32S * 4)) {
    this.i32 = new Int32Array(sab, 0, CTL_INT32S);
  }

  get command(): number {
    return Atomics.load(this.i32, CTL_CMD);
  }
  setCommand(cmd: number): void {
    Atomics.store(this.i32, CTL_CMD, cmd);
    Atomics.notify(this.i32, CTL_CMD);
  }
  get state(): number {
    return Atomics.load(this.i32, CTL_STATE);
  }
  setState(state: number): void {
    Atomics.store(this.i32, CTL_STATE, state);
    Atomics.notify(this.i32, CTL_STATE);
  }
  /** Worker side: publishes the kernel tid of the thread to kick. */
  publishThread(tid: number): void {
    Atomics.store(this.i32, CTL_TID, tid);
    Atomics.store(this.i32, CTL_READY, 1);
    Atomics.notify(this.i32, CTL_READY);
  }
  /** Main thread: asks for an NMI (the caller then kicks the vCPU out of KVM_RUN). */
  requestNmi(): void {
    Atomics.store(this.i32, CTL_NMI, 1);
  }
  /** Worker side: whether an NMI was asked for since the last call. */
  takeNmi(): boolean {
    return Atomics.exchange(this.i32, CTL_NMI, 0) === 1;
  }
  /** Generation of the last PCI change the worker applied (worker side sets it, then notifies). */
  get pciGeneration(): number {
    return Atomics.load(this.i32, CTL_PCI_GEN);
  }
  setPciGeneration(gen: number): void {
    Atomics.store(this.i32, CTL_PCI_GEN, gen);
    Atomics.notify(this.i32, CTL_PCI_GEN);
  }
  /** Main thread: resolves once the worker has applied PCI change `gen` (or has stopped). */
  async waitPciGeneration(gen: number, timeoutMs: number): Promise<boolean> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const now = this.pciGeneration;
      if (now >= gen || this.state === State.Stopped) return true;
      const left = deadline - performance.now();
      if (left <= 0) return false;
      const w = Atomics.waitAsync(this.i32, CTL_PCI_GEN, now, Math.min(left, 1000));
      if (w.async) await w.value;
    }
  }
  /** The worker's kernel tid, or null before it started. */
  get thread(): number | null {
    return Atomics.load(this.i32, CTL_READY) === 1 ? Atomics.load(this.i32, CTL_TID) : null;
  }
}

/** A VM-wide event word: the first event raised wins; the main thread waits on it. */
export class VmEvents {
  readonly i32: Int32Array;
  constructor(readonly sab: SharedArrayBuffer = new SharedArrayBuffer(8)) {
    this.i32 = new Int32Array(sab);
  }
  /**
   * Raises an event; returns false when another event was raised first. `source` says what caused it
   * (an {@link EventSource} of devices/shared.ts); it shares the event's word (bits 8 and up), so whoever
   * sees the event sees its source too.
   */
  raise(e: VmEventCode, source = 0): boolean {
    const won = Atomics.compareExchange(this.i32, 0, VmEvent.None, e | (source << 8)) === VmEvent.None;
    Atomics.notify(this.i32, 0);
    return won;
  }
  /** The source given with the event raised (0 when none was said). */
  get source(): number {
    return Atomics.load(this.i32, 0) >>> 8;
  }
  get current(): number {
    return Atomics.load(this.i32, 0) & 0xff;
  }
  /** Main thread: resolves with the next event (non-blocking wait). */
  async next(): Promise<number> {
    while (this.current === VmEvent.None) {
      const w = Atomics.waitAsync(this.i32, 0, VmEvent.None);
      if (w.async) await w.value;
    }
    return this.current;
  }
  reset(): void {
    Atomics.store(this.i32, 0, VmEvent.None);
  }
}
