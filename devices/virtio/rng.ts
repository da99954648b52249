/**
 * virtio-rng (entropy device) request processing: every device-writable buffer of a chain is filled
 * with random bytes from an entropy source. Readable buffers are ignored.
 */

import { F, featureBit } from "./constants.ts";
import type { DescriptorChain, SplitQueue } from "./queue.ts";

/** Something that fills buffers with random bytes. */
export interface EntropySource {
  fill(buf: Uint8Array): void;
}

/** The Web Crypto CSPRNG (getRandomValues takes at most 65536 bytes per call). */
export const cryptoSource: EntropySource = {
  fill(buf: Uint8Array): void {
    for (let o = 0; o < buf.length; o += 65536) crypto.getRandomValues(buf.subarray(o, o + 65536));
  },
};

/** Reads entropy from a file such as /dev/urandom. */
export class FileEntropySource implements EntropySource {
  readonly #file: Deno.FsFile;
  constructor(readonly path = "/dev/urandom") {
    this.#file = Deno.openSync(path, { read: true });
  }
  fill(buf: Uint8Array): void {
    let done = 0;
    while (done < buf.length) {
      const n = this.#file.readSync(buf.subarray(done));
      if (n === null || n === 0) throw new Error(`entropy source ${this.path} exhausted`);
      done += n;
    }
  }
  close(): void {
    this.#file.close();
  }
}

/** Features offered by virtio-rng. */
export function rngFeatures(): bigint {
  return featureBit(F.VERSION_1) | featureBit(F.EVENT_IDX) | featureBit(F.INDIRECT_DESC);
}

/** Most bytes served per request; the driver accepts short fills (the used length says how many). */
export const RNG_MAX_REQUEST = 1 << 20;

/** Counters (over a SharedArrayBuffer so other threads can read them): read_bytes, read_ops. */
export class RngCounters {
  readonly values: Float64Array;
  constructor(buffer?: SharedArrayBuffer | ArrayBuffer) {
    this.values = new Float64Array(buffer ?? new SharedArrayBuffer(16), 0, 2);
  }
  snapshot(): { read_bytes: number; read_ops: number } {
    return { read_bytes: this.values[0], read_ops: this.values[1] };
  }
}

export class RngDevice {
  readonly counters: RngCounters;
  constructor(readonly source: EntropySource = cryptoSource, counters?: RngCounters) {
    this.counters = counters ?? new RngCounters();
  }

  /**
   * Fills the chain's writable buffers; returns the used length (bytes written). A source that fails part
   * way gives a short fill; one that gives nothing at all throws: the device has failed (the guest would
   * otherwise ask again forever), and the worker marks it DEVICE_NEEDS_RESET.
   */
  handle(chain: DescriptorChain): number {
    if (chain.error !== null) return 0;
    let left = RNG_MAX_REQUEST;
    let done = 0;
    for (let i = 0; i < chain.writableCount && left > 0; i++) {
      let view = chain.writable(i);
      if (view.length > left) view = view.subarray(0, left);
      try {
        this.source.fill(view);
      } catch (e) {
        if (done === 0) throw e;
        break;
      }
      done += view.length;
      left -= view.length;
    }
    this.counters.values[0] += done;
    this.counters.values[1]++;
    return done;
  }

  /** Completes every available chain; returns true when the driver should be interrupted. */
  processQueue(q: SplitQueue): boolean {
    for (;;) {
      const chain = q.popChain();
      if (chain === null || q.broken !== null) break;
      if (!chain.headValid) continue;
      q.pushUsed(chain.head, this.handle(chain));
    }
    return q.needsInterrupt();
  }
}
