import assert from "node:assert/strict";
import { Serial16550, UART } from "../devices/serial.ts";
import { SharedLock } from "../devices/shared.ts";
import type { LockJob, SerialJob } from "./devices_serial_worker.ts";

const WORKER = new URL("./devices_serial_worker.ts", import.meta.url).href;

function run<T>(job: SerialJob | LockJob): Promise<T> {
  const w = new Worker(WORKER, { type: "module" });
  return new Promise<T>((resolve, reject) => {
    w.onmessage = (ev) => {
      resolve(ev.data as T);
      w.terminate();
    };
    w.onerror = (ev) => {
      ev.preventDefault();
      reject(new Error(ev.message));
      w.terminate();
    };
    w.postMessage(job);
  });
}

/** Whether `sub` appears in `seq` in order (not necessarily contiguous). */
function isSubsequence(sub: number[], seq: Uint8Array): boolean {
  let j = 0;
  for (let i = 0; i < seq.length && j < sub.length; i++) if (seq[i] === sub[j]) j++;
  return j === sub.length;
}

Deno.test("shared lock: two workers and the main thread keep a plain counter exact", async () => {
  const sab = new SharedArrayBuffer(32);
  const i32 = new Int32Array(sab);
  const iterations = 20_000;
  const done = [run({ mode: "lock", sab, iterations }), run({ mode: "lock", sab, iterations })];
  const lock = new SharedLock(i32, 0);
  for (let i = 0; i < 20_000; i++) {
    lock.lock();
    i32[4] = i32[4] + 1;
    lock.unlock();
    if ((i & 1023) === 0) await new Promise((r) => setTimeout(r, 0));
  }
  await Promise.all(done);
  assert.equal(i32[4], 2 * iterations + 20_000);
  assert.ok(!lock.locked, "lock released");
  assert.ok(lock.tryLock());
  assert.ok(!lock.tryLock());
  lock.unlock();
});

Deno.test("serial: two vCPU workers transmit while the main thread feeds input", async () => {
  const COUNT = 3000;
  const INPUT = 3000;
  const desc = Serial16550.createDescriptor({ hostQueueBytes: 256 });
  const out = new SharedArrayBuffer(8 + 2 * COUNT);
  const irq = new SharedArrayBuffer(16);
  const flags = new SharedArrayBuffer(16);
  const irqDouble = {
    set(level: boolean) {
      const a = new Int32Array(irq);
      Atomics.add(a, level ? 0 : 1, 1);
      if (Atomics.exchange(a, 2, level ? 1 : 0) === (level ? 1 : 0)) Atomics.add(a, 3, 1);
    },
  };
  const host = new Serial16550(desc, { irq: irqDouble, out: { write: () => assert.fail("host writes") } });
  // As the driver would after start-up: FIFOs on, OUT2, RX and THRE interrupts enabled.
  host.pioWrite(UART.LCR, 1, 0x03);
  host.pioWrite(UART.FCR, 1, 0xc1);
  host.pioWrite(UART.MCR, 1, 0x0b);
  host.pioWrite(UART.IER, 1, 0x03);

  const jobs = [0x00, 0x80].map((tag) =>
    run<{ received: number[] }>({ mode: "serial", desc, out, irq, flags, tag, count: COUNT })
  );

  const input = Uint8Array.from({ length: INPUT }, (_, i) => (i * 13) & 0xff);
  let sent = 0;
  while (sent < INPUT) {
    sent += host.enqueueInput(input.subarray(sent, Math.min(INPUT, sent + 97)));
    await new Promise((r) => setTimeout(r, 0));
  }
  Atomics.store(new Int32Array(flags), 0, 1);
  const results = await Promise.all(jobs);
  host.flush();

  // Output: every byte once, each worker's bytes in its own order.
  const n = new Int32Array(out, 0, 1)[0];
  assert.equal(n, 2 * COUNT);
  const bytes = new Uint8Array(out, 8, n);
  for (const tag of [0x00, 0x80]) {
    const mine = [...bytes].filter((b) => (b & 0x80) === tag);
    assert.deepEqual(mine, Array.from({ length: COUNT }, (_, i) => tag | (i & 0x7f)), `worker ${tag}`);
  }
  assert.equal(host.stats().txBytes, 2 * COUNT);

  // Input: every byte delivered exactly once; each reader saw its share in input order.
  const all = results.flatMap((r) => r.received);
  assert.equal(all.length, INPUT);
  assert.deepEqual([...all].sort((a, b) => a - b), [...input].sort((a, b) => a - b));
  for (const r of results) assert.ok(isSubsequence(r.received, input));
  assert.equal(host.stats().overruns, 0);

  // The IRQ line only ever changed level (never reported the same level twice in a row).
  const ir = new Int32Array(irq);
  assert.equal(ir[3], 0);
  assert.ok(ir[0] > 0);
  assert.ok(ir[0] - ir[1] === 0 || ir[0] - ir[1] === 1);
  assert.equal(host.pioRead(UART.LSR, 1) & 0x01, 0);
});
