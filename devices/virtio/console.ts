/**
 * virtio-console (virtio 1.x, "Console Device") with a single port and no MULTIPORT: queue 0 is the
 * port's receiveq (host → guest), queue 1 its transmitq (guest → host). Linux binds it to hvc0.
 *
 * Output goes to a {@link ByteSink} (stdout, a file, or nowhere). Input comes from a
 * {@link ConsoleInput}: a single-producer/single-consumer byte ring in a SharedArrayBuffer, filled by
 * the main thread (stdin) and drained by the device worker into the guest's receive buffers.
 */
import { F, featureBit } from "./constants.ts";
import type { SplitQueue } from "./queue.ts";

export const CONSOLE_RX_QUEUE = 0;
export const CONSOLE_TX_QUEUE = 1;
/** Configuration space: cols u16, rows u16, max_nr_ports u32, emerg_wr u32. */
export const CONSOLE_CONFIG_SIZE = 12;

export function consoleFeatures(): bigint {
  return featureBit(F.VERSION_1) | featureBit(F.EVENT_IDX) | featureBit(F.INDIRECT_DESC);
}

export function consoleConfigSpace(): Uint8Array {
  const b = new Uint8Array(CONSOLE_CONFIG_SIZE);
  new DataView(b.buffer).setUint32(4, 1, true); // max_nr_ports (only read with MULTIPORT)
  return b;
}

/** Where console output goes. */
export interface ByteSink {
  write(bytes: Uint8Array): void;
}

const IN_HEADER = 8; // Int32 [0] = read position, [1] = write position (free-running, mod 2^32)

/** A byte ring between one producer thread and one consumer thread. */
export class ConsoleInput {
  readonly #pos: Int32Array;
  readonly #data: Uint8Array;
  readonly #mask: number;

  /** `capacity` must be a power of two. */
  static create(capacity = 1 << 16): SharedArrayBuffer {
    if (capacity & (capacity - 1)) throw new Error("console input capacity must be a power of two");
    return new SharedArrayBuffer(IN_HEADER + capacity);
  }

  constructor(readonly buffer: SharedArrayBuffer) {
    this.#pos = new Int32Array(buffer, 0, 2);
    this.#data = new Uint8Array(buffer, IN_HEADER);
    this.#mask = this.#data.length - 1;
  }

  /** Bytes waiting. */
  get available(): number {
    return (Atomics.load(this.#pos, 1) - Atomics.load(this.#pos, 0)) >>> 0;
  }

  /** Producer: appends as much of `bytes` as fits; returns the count accepted. */
  push(bytes: Uint8Array): number {
    const r = Atomics.load(this.#pos, 0) >>> 0;
    const w = Atomics.load(this.#pos, 1) >>> 0;
    const room = this.#data.length - ((w - r) >>> 0);
    const n = Math.min(room, bytes.length);
    for (let i = 0; i < n; i++) this.#data[(w + i) & this.#mask] = bytes[i];
    Atomics.store(this.#pos, 1, (w + n) | 0);
    return n;
  }

  /** Consumer: moves up to dst.length bytes into dst; returns the count. */
  pull(dst: Uint8Array): number {
    const r = Atomics.load(this.#pos, 0) >>> 0;
    const w = Atomics.load(this.#pos, 1) >>> 0;
    const n = Math.min((w - r) >>> 0, dst.length);
    for (let i = 0; i < n; i++) dst[i] = this.#data[(r + i) & this.#mask];
    Atomics.store(this.#pos, 0, (r + n) | 0);
    return n;
  }
}

/** Counters: tx_bytes (guest → host) and rx_bytes (host → guest). */
export class ConsoleCounters {
  readonly values: Float64Array;
  constructor(buffer?: SharedArrayBuffer | ArrayBuffer) {
    this.values = new Float64Array(buffer ?? new SharedArrayBuffer(16), 0, 2);
  }
  snapshot(): { rx_bytes: number; tx_bytes: number } {
    return { rx_bytes: this.values[0], tx_bytes: this.values[1] };
  }
}

/** Request processing for the console's port 0. */
export class ConsoleDevice {
  readonly counters: ConsoleCounters;
  constructor(readonly sink: ByteSink, readonly input: ConsoleInput, counters?: ConsoleCounters) {
    this.counters = counters ?? new ConsoleCounters();
  }

  /** Writes every available TX chain's readable bytes to the sink. Returns true to interrupt. */
  processTx(q: SplitQueue): boolean {
    for (;;) {
      const chain = q.popChain();
      if (chain === null || q.broken !== null) break;
      if (!chain.headValid) continue;
      if (chain.error === null) {
        for (let i = 0; i < chain.readableCount; i++) {
          try {
            this.sink.write(chain.readable(i));
          } catch {
            // output errors drop output; the guest keeps running
          }
        }
        this.counters.values[1] += chain.readableBytes;
      }
      q.pushUsed(chain.head, 0);
    }
    return q.needsInterrupt();
  }

  /** Moves waiting input into available RX chains. Returns true to interrupt. */
  processRx(q: SplitQueue): boolean {
    while (this.input.available > 0) {
      const chain = q.popChain();
      if (chain === null || q.broken !== null) break;
      if (!chain.headValid) continue;
      let done = 0;
      if (chain.error === null) {
        for (let i = 0; i < chain.writableCount && this.input.available > 0; i++) {
          done += this.input.pull(chain.writable(i));
        }
      }
      this.counters.values[0] += done;
      q.pushUsed(chain.head, done);
    }
    return q.needsInterrupt();
  }
}
