/// <reference lib="deno.worker" />
/**
 * Worker side of tests/devices_serial_mt_test.ts: builds a UART (or a bare lock) over shared state
 * received from the main thread and hammers it, as a vCPU worker would.
 */
import { Serial16550, type SerialDescriptor, UART } from "../devices/serial.ts";
import { SharedLock } from "../devices/shared.ts";

export interface SerialJob {
  mode: "serial";
  desc: SerialDescriptor;
  /** Int32 [0] = bytes written; bytes from offset 8. */
  out: SharedArrayBuffer;
  /** Int32 [0] = set(true) calls, [1] = set(false) calls, [2] = last level, [3] = repeated levels. */
  irq: SharedArrayBuffer;
  /**
   * Int32 [0] = 1 once the main thread has enqueued all input; [1..4) a lock standing for the guest
   * driver's port lock (a driver never runs "LSR says data, read RBR" on two CPUs at once).
   */
  flags: SharedArrayBuffer;
  tag: number;
  count: number;
}

export interface LockJob {
  mode: "lock";
  sab: SharedArrayBuffer;
  iterations: number;
}

function runSerial(job: SerialJob): number[] {
  const outHdr = new Int32Array(job.out, 0, 2);
  const outBytes = new Uint8Array(job.out, 8);
  const irq = new Int32Array(job.irq);
  const flags = new Int32Array(job.flags);
  const s = new Serial16550(job.desc, {
    irq: {
      set(level) {
        Atomics.add(irq, level ? 0 : 1, 1);
        if (Atomics.exchange(irq, 2, level ? 1 : 0) === (level ? 1 : 0)) Atomics.add(irq, 3, 1);
      },
    },
    out: {
      write(b) {
        const at = Atomics.add(outHdr, 0, b.length);
        outBytes.set(b, at);
      },
    },
  });
  const received: number[] = [];
  const portLock = new SharedLock(flags, 1);
  const drain = () => {
    portLock.lock();
    while (s.pioRead(UART.LSR, 1) & 0x01) received.push(s.pioRead(UART.RBR, 1));
    portLock.unlock();
  };
  for (let i = 0; i < job.count; i++) {
    s.pioWrite(UART.THR, 1, job.tag | (i & 0x7f));
    if ((i & 15) === 0) {
      s.pioRead(UART.IIR, 1);
      drain();
    }
  }
  while (Atomics.load(flags, 0) === 0) drain();
  drain();
  s.flush();
  return received;
}

function runLock(job: LockJob): void {
  const i32 = new Int32Array(job.sab);
  const lock = new SharedLock(i32, 0);
  for (let i = 0; i < job.iterations; i++) {
    lock.lock();
    // A non-atomic read-modify-write: only correct under mutual exclusion.
    const v = i32[4];
    i32[5] = (i32[5] + 1) | 0;
    i32[4] = v + 1;
    lock.unlock();
  }
}

self.onmessage = (ev: MessageEvent<SerialJob | LockJob>) => {
  const job = ev.data;
  if (job.mode === "serial") self.postMessage({ received: runSerial(job) });
  else {
    runLock(job);
    self.postMessage({ done: true });
  }
  self.close();
};
