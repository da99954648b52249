/**
 * virtio-balloon (virtio 1.x, "Traditional Memory Balloon Device", type 5), as Cloud Hypervisor offers
 * it: no statistics queue, no free page hinting; optionally DEFLATE_ON_OOM and free page reporting.
 *
 * Configuration space (8 bytes): le32 num_pages (the target, in 4 KiB pages, set by the host) and
 * le32 actual (the pages in the balloon, written by the driver; the only field the driver may write).
 *
 * Queues: 0 inflateq, 1 deflateq, 2 reporting_vq (only with VIRTIO_BALLOON_F_REPORTING: the queue
 * numbering skips the statistics and hinting queues, which are not offered).
 * - inflate: the readable stream is an array of le32 PFNs (4 KiB frames). Each frame inside guest RAM is
 *   given back to the host ({@link MemoryReleaser}: MADV_DONTNEED, or MADV_REMOVE for memfd RAM), in runs
 *   of adjacent frames; the guest will not touch them until it deflates.
 * - deflate: the same array; the frames are the guest's again. Nothing to do on the host (a released
 *   page is faulted back in, zeroed, on the guest's next access); only counted.
 * - reporting: every buffer of a chain is a free range of guest RAM; the whole 4 KiB pages inside it
 *   are released.
 * Every chain is completed with used length 0 (the device writes nothing).
 *
 * Hostile input never throws and never reaches memory outside guest RAM: a chain with a descriptor
 * error, a PFN array whose length is not a multiple of 4 or is larger than {@link MAX_PFN_BYTES} is
 * completed untouched and counted; PFNs outside guest RAM are skipped and counted.
 */
import { shim } from "../../ffi/shim.ts";
import { MADV_DONTNEED, MADV_REMOVE } from "../../ffi/kvm_constants.ts";
import type { GuestMemory } from "../../vmm/memory.ts";
import { F, featureBit } from "./constants.ts";
import type { DescriptorChain, SplitQueue } from "./queue.ts";
import { DEVICE_CFG_OFFSET, type VirtioPciDevice } from "./pci_transport.ts";
import type { VirtioDeviceHandle } from "./device_shared.ts";

export const BALLOON_F_DEFLATE_ON_OOM = 2;
export const BALLOON_F_REPORTING = 5;
/** The balloon's unit: PFNs count 4 KiB frames whatever the page size. */
export const BALLOON_PAGE = 4096;
export const BALLOON_CONFIG_SIZE = 8;
const CONFIG_NUM_PAGES = 0;
const CONFIG_ACTUAL = 4;
export const INFLATE_QUEUE = 0;
export const DEFLATE_QUEUE = 1;
export const REPORTING_QUEUE = 2;
/** Queue sizes (Cloud Hypervisor's): inflate and deflate 128, reporting 32. */
export const BALLOON_QUEUE_SIZE = 128;
export const REPORTING_QUEUE_SIZE = 32;
/**
 * Most PFN bytes taken from one inflate/deflate chain: Linux sends at most 256 PFNs per chain; this
 * leaves room for other drivers while bounding the work one chain can ask for.
 */
export const MAX_PFN_BYTES = 256 * 1024;

export interface BalloonOptions {
  deflateOnOom?: boolean;
  freePageReporting?: boolean;
}

export function balloonFeatures(o: BalloonOptions = {}): bigint {
  let f = featureBit(F.VERSION_1);
  if (o.deflateOnOom) f |= featureBit(BALLOON_F_DEFLATE_ON_OOM);
  if (o.freePageReporting) f |= featureBit(BALLOON_F_REPORTING);
  return f;
}

/** Queue count: inflate and deflate, plus the reporting queue when free page reporting is on. */
export function balloonQueues(o: BalloonOptions = {}): number {
  return o.freePageReporting ? 3 : 2;
}

/** Pages for a target in bytes (Cloud Hypervisor's: whole 4 KiB pages, as a le32). */
export function balloonPages(bytes: number): number {
  return Math.floor(bytes / BALLOON_PAGE) >>> 0;
}

export function balloonConfigSpace(targetBytes: number): Uint8Array {
  const b = new Uint8Array(BALLOON_CONFIG_SIZE);
  new DataView(b.buffer).setUint32(CONFIG_NUM_PAGES, balloonPages(targetBytes), true);
  return b;
}

/**
 * A driver write to the configuration space (vCPU thread, device lock held): only `actual`, written
 * whole (4 bytes at offset 4), is taken; anything else is read-only and ignored.
 */
export function balloonConfigWrite(t: VirtioPciDevice, offset: number, data: Uint8Array): void {
  if (offset !== CONFIG_ACTUAL || data.length !== 4) return;
  t.updateDeviceConfig(CONFIG_ACTUAL, data.slice());
}

/** Gives guest RAM back to the host. `gpa` and `len` are 4 KiB aligned; false when it failed. */
export interface MemoryReleaser {
  release(gpa: number, len: number): boolean;
}

/**
 * The real releaser: madvise over the host mapping of guest RAM. Private anonymous RAM drops its pages
 * with MADV_DONTNEED; shared (memfd) RAM needs MADV_REMOVE to free the backing store too.
 */
export function hostMemoryReleaser(mem: GuestMemory, sharedMemory: boolean): MemoryReleaser {
  const advice = sharedMemory ? MADV_REMOVE : MADV_DONTNEED;
  const s = shim();
  return {
    release(gpa, len) {
      if (!mem.contains(gpa, len)) return false;
      return s.kvs_madvise_at(Number(mem.hostAddress(gpa, len)), len, advice) === 0;
    },
  };
}

/** Counters, dvmm's own (Cloud Hypervisor reports none for the balloon). */
export const BALLOON_COUNTERS = [
  "inflated_bytes",
  "deflated_bytes",
  "reported_bytes",
  "release_errors",
  "bad_requests",
] as const;

export class BalloonCounters {
  readonly values: Float64Array;
  constructor(buffer?: SharedArrayBuffer | ArrayBuffer) {
    this.values = new Float64Array(
      buffer ?? new SharedArrayBuffer(8 * BALLOON_COUNTERS.length),
      0,
      BALLOON_COUNTERS.length,
    );
  }
  snapshot(): Record<(typeof BALLOON_COUNTERS)[number], number> {
    const v = this.values;
    return {
      inflated_bytes: v[0],
      deflated_bytes: v[1],
      reported_bytes: v[2],
      release_errors: v[3],
      bad_requests: v[4],
    };
  }
}

const C_INFLATED = 0, C_DEFLATED = 1, C_REPORTED = 2, C_ERRORS = 3, C_BAD = 4;

/** The balloon's queue processing (device worker). */
export class BalloonDevice {
  readonly counters: BalloonCounters;
  readonly #buf = new Uint8Array(1024);
  readonly #view = new DataView(this.#buf.buffer);
  #runStart = 0;
  #runLen = 0;

  constructor(readonly releaser: MemoryReleaser, readonly mem: GuestMemory, counters?: BalloonCounters) {
    this.counters = counters ?? new BalloonCounters();
  }

  /** Serves queue `index` after a notify, until the driver adds nothing more; true → interrupt. */
  service(q: SplitQueue, index: number): boolean {
    let irq = false;
    do {
      if (this.processQueue(q, index)) irq = true;
      if (q.broken !== null) break;
    } while (q.enableNotification());
    return irq;
  }

  /** Completes every available chain of queue `index`; returns true when the driver should be interrupted. */
  processQueue(q: SplitQueue, index: number): boolean {
    for (;;) {
      const chain = q.popChain();
      if (chain === null || q.broken !== null) break;
      if (!chain.headValid) continue; // no id to give back
      if (chain.error !== null) this.counters.values[C_BAD]++;
      else if (index === INFLATE_QUEUE || index === DEFLATE_QUEUE) this.#pfns(chain, index === INFLATE_QUEUE);
      else if (index === REPORTING_QUEUE) this.#report(chain);
      else this.counters.values[C_BAD]++;
      q.pushUsed(chain.head, 0);
    }
    return q.needsInterrupt();
  }

  /** An inflate (release) or deflate (account) request: the readable stream is an array of le32 PFNs. */
  #pfns(chain: DescriptorChain, inflate: boolean): void {
    const v = this.counters.values;
    const total = chain.readableBytes;
    if (total % 4 !== 0 || total > MAX_PFN_BYTES) {
      v[C_BAD]++;
      return;
    }
    const buf = this.#buf;
    const mem = this.mem;
    let bad = false;
    for (let pos = 0; pos < total; pos += buf.length) {
      const n = chain.readAt(pos, buf.subarray(0, Math.min(buf.length, total - pos)));
      for (let o = 0; o + 4 <= n; o += 4) {
        const gpa = this.#view.getUint32(o, true) * BALLOON_PAGE;
        if (!mem.contains(gpa, BALLOON_PAGE)) {
          bad = true;
          continue;
        }
        if (!inflate) {
          v[C_DEFLATED] += BALLOON_PAGE;
          continue;
        }
        v[C_INFLATED] += BALLOON_PAGE;
        // Adjacent frames of one RAM region go to the host in one call.
        if (
          this.#runLen > 0 && gpa === this.#runStart + this.#runLen &&
          mem.contains(this.#runStart, this.#runLen + BALLOON_PAGE)
        ) {
          this.#runLen += BALLOON_PAGE;
        } else {
          this.#flushRun();
          this.#runStart = gpa;
          this.#runLen = BALLOON_PAGE;
        }
      }
    }
    this.#flushRun();
    if (bad) v[C_BAD]++;
  }

  #flushRun(): void {
    if (this.#runLen === 0) return;
    if (!this.releaser.release(this.#runStart, this.#runLen)) this.counters.values[C_ERRORS]++;
    this.#runLen = 0;
  }

  /** A free page report: every buffer (device-writable, as Linux sends them) is a free range. */
  #report(chain: DescriptorChain): void {
    for (let i = 0; i < chain.writableCount; i++) {
      this.#releaseRange(chain.writableGpa(i), chain.writableLen(i));
    }
    for (let i = 0; i < chain.readableCount; i++) {
      this.#releaseRange(chain.readableGpa(i), chain.readableLen(i));
    }
  }

  /** Releases the whole pages inside [gpa, gpa+len) (the queue checked that the range is RAM). */
  #releaseRange(gpa: number, len: number): void {
    const start = Math.ceil(gpa / BALLOON_PAGE) * BALLOON_PAGE;
    const end = Math.floor((gpa + len) / BALLOON_PAGE) * BALLOON_PAGE;
    if (end <= start) return;
    const v = this.counters.values;
    if (this.releaser.release(start, end - start)) v[C_REPORTED] += end - start;
    else v[C_ERRORS]++;
  }
}

/**
 * The main thread's handle on the balloon: its target (num_pages) and actual size, read from and
 * written to the shared configuration space under the device lock.
 */
export class BalloonControl {
  readonly #b4 = new Uint8Array(4);

  constructor(readonly handle: VirtioDeviceHandle) {}

  #readConfig(offset: number): number {
    const h = this.handle;
    h.lock.lock();
    try {
      h.transport.mmioRead(DEVICE_CFG_OFFSET + offset, this.#b4);
    } finally {
      h.lock.unlock();
    }
    return new DataView(this.#b4.buffer).getUint32(0, true);
  }

  /** Bytes in the balloon, as the driver last reported them (`actual`). */
  actualBytes(): number {
    return this.#readConfig(CONFIG_ACTUAL) * BALLOON_PAGE;
  }

  /** The size the host asks for (`num_pages`), in bytes. */
  targetBytes(): number {
    return this.#readConfig(CONFIG_NUM_PAGES) * BALLOON_PAGE;
  }

  /** Asks the guest to grow or shrink the balloon to `bytes`: new num_pages + a config interrupt. */
  setTarget(bytes: number): void {
    if (!Number.isSafeInteger(bytes) || bytes < 0) throw new RangeError(`bad balloon size ${bytes}`);
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, balloonPages(bytes), true);
    this.handle.updateConfig(CONFIG_NUM_PAGES, b);
  }

  /** vm.counters entry: the sizes, then the worker's counters. */
  counters(): Record<string, number> {
    return {
      actual_bytes: this.actualBytes(),
      target_bytes: this.targetBytes(),
      ...new BalloonCounters(this.handle.desc.counters).snapshot(),
    };
  }
}
