/**
 * virtio-pmem (virtio 1.x, "PMEM Device", type 27): a host file mapped into guest physical memory that
 * the guest drives as a persistent-memory region (Linux: virtio_pmem + nd_pmem → /dev/pmem0). Loads
 * and stores reach the mapping directly through a KVM memory slot (set up by device_pmem.ts); the one
 * request queue only carries flushes, which make the guest's stores durable in the host file.
 *
 * Configuration space: { le64 start, le64 size }: the region's guest-physical address and length.
 *
 * Request: the device-readable stream starts with { le32 type }; the device writes { le32 ret } at the
 * start of the device-writable stream (used length 4). Type 0 is FLUSH; ret 0 means OK, 1 means EIO.
 * Any other type is answered EIO. A chain without 4 readable bytes or without 4 writable bytes has
 * nowhere (safe) to put an answer: it is completed with used length 0 and counted as malformed.
 */
import { F, featureBit } from "./constants.ts";
import type { DescriptorChain, SplitQueue } from "./queue.ts";

export const PMEM_REQ_FLUSH = 0;
export const PMEM_RESP_OK = 0;
export const PMEM_RESP_EIO = 1;
/** Configuration space: start (le64), size (le64). */
export const PMEM_CONFIG_SIZE = 16;
/** The request queue's size (Cloud Hypervisor's). */
export const PMEM_QUEUE_SIZE = 256;
/** Region placement and size granularity: 2 MiB, so the guest can map it with huge pages. */
export const PMEM_ALIGN = 0x20_0000;

/** Features: VERSION_1 only, as Cloud Hypervisor offers. */
export function pmemFeatures(): bigint {
  return featureBit(F.VERSION_1);
}

export function pmemConfigSpace(start: number, size: number): Uint8Array {
  const b = new Uint8Array(PMEM_CONFIG_SIZE);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, BigInt(start), true);
  v.setBigUint64(8, BigInt(size), true);
  return b;
}

/** What a flush does: make the mapped file durable (throws on failure). */
export interface PmemBackend {
  flush(): void;
}

/** Counters, dvmm's own (Cloud Hypervisor reports none for pmem). */
export const PMEM_COUNTERS = ["flush_ops", "flush_errors", "bad_requests"] as const;

export class PmemCounters {
  readonly values: Float64Array;
  constructor(buffer?: SharedArrayBuffer | ArrayBuffer) {
    this.values = new Float64Array(buffer ?? new SharedArrayBuffer(8 * PMEM_COUNTERS.length), 0, 3);
  }
  snapshot(): Record<(typeof PMEM_COUNTERS)[number], number> {
    const v = this.values;
    return { flush_ops: v[0], flush_errors: v[1], bad_requests: v[2] };
  }
}

export class PmemDevice {
  readonly counters: PmemCounters;
  readonly #word = new Uint8Array(4);
  readonly #view = new DataView(this.#word.buffer);

  /**
   * `discardWrites`: the mapping is private (the host file never changes), so a flush has nothing to
   * make durable and is answered OK at once.
   */
  constructor(readonly backend: PmemBackend, readonly discardWrites = false, counters?: PmemCounters) {
    this.counters = counters ?? new PmemCounters();
  }

  /** Executes one request; returns the used length (4 when an answer was written, else 0). */
  handle(chain: DescriptorChain): number {
    const v = this.counters.values;
    if (chain.error !== null || chain.readableBytes < 4 || chain.writableBytes < 4) {
      v[2]++;
      return 0;
    }
    chain.readAt(0, this.#word);
    const type = this.#view.getUint32(0, true);
    let ret = PMEM_RESP_EIO;
    if (type === PMEM_REQ_FLUSH) {
      v[0]++;
      ret = PMEM_RESP_OK;
      if (!this.discardWrites) {
        try {
          this.backend.flush();
        } catch {
          v[1]++;
          ret = PMEM_RESP_EIO;
        }
      }
    } else {
      v[2]++;
    }
    this.#view.setUint32(0, ret, true);
    chain.writeAt(0, this.#word);
    return 4;
  }

  /** Serves the queue after a notify, until the driver adds nothing more; true → interrupt. */
  service(q: SplitQueue, _index = 0): boolean {
    let irq = false;
    do {
      if (this.processQueue(q)) irq = true;
      if (q.broken !== null) break;
    } while (q.enableNotification());
    return irq;
  }

  /** Completes every available chain; returns true when the driver should be interrupted. */
  processQueue(q: SplitQueue): boolean {
    for (;;) {
      const chain = q.popChain();
      if (chain === null || q.broken !== null) break;
      if (!chain.headValid) continue; // no id to give back
      q.pushUsed(chain.head, this.handle(chain));
    }
    return q.needsInterrupt();
  }
}
