/**
 * Which guest pages were written since the last look, for live migration's pre-copy rounds.
 *
 * Two sources, merged: KVM's dirty log (KVM_MEM_LOG_DIRTY_PAGES on every memory slot; KVM_GET_DIRTY_LOG
 * reads and clears it atomically) catches what the vCPUs write; the kernel's soft-dirty bits of this
 * process's page tables (/proc/self/pagemap, cleared through /proc/self/clear_refs) catch every other
 * writer: the device workers, and the kernel itself when a tap's readv lands a frame straight in guest
 * memory, which KVM's log never sees. Soft-dirty has no atomic read-and-clear, so the device workers are
 * held (`quiesce`) while it is read and cleared; the vCPUs run on.
 */
import type { VmFd } from "../ffi/kvm.ts";
import { KVM_MEM_LOG_DIRTY_PAGES, O_RDONLY, O_WRONLY } from "../ffi/kvm_constants.ts";
import { check, cstr, shim } from "../ffi/shim.ts";

const PAGE = 4096;
const SOFT_DIRTY_HIGH_BIT = 1 << 23; // bit 55 of a pagemap entry, in its high 32-bit word

/** A KVM memory slot and where its memory sits in the migrated pieces. */
export interface TrackedSlot {
  slot: number;
  gpa: number;
  size: number;
  hostAddr: bigint;
  piece: number;
  pieceOffset: number;
}

/** A stretch of guest memory as migration sends it. */
export interface TrackedPiece {
  hostAddr: bigint;
  size: number;
}

/** Dirty runs: [piece, byte offset, byte length] triples. */
export type DirtyRuns = number[];

export class DirtyTracker {
  readonly #pages: Uint8Array[];
  readonly #kvmMaps: BigUint64Array<ArrayBuffer>[];
  #pagemap: Uint32Array | null = null;
  #on = false;

  constructor(readonly vm: VmFd, readonly slots: TrackedSlot[], readonly pieces: TrackedPiece[]) {
    this.#pages = pieces.map((p) => new Uint8Array(Math.ceil(p.size / PAGE)));
    this.#kvmMaps = slots.map((s) => new BigUint64Array(Math.ceil(s.size / PAGE / 64)));
  }

  /** Turns KVM's dirty log on for every slot and clears the soft-dirty bits: tracking starts now. */
  start(): void {
    for (const s of this.slots) this.#setLogging(s, true);
    this.#on = true;
    clearSoftDirty();
  }

  /** Turns KVM's dirty log off again (migration finished or cancelled). */
  stop(): void {
    if (!this.#on) return;
    this.#on = false;
    for (const s of this.slots) {
      try {
        this.#setLogging(s, false);
      } catch { /* the VM is going away */ }
    }
  }

  #setLogging(s: TrackedSlot, on: boolean): void {
    this.vm.setUserMemoryRegion({
      slot: s.slot,
      flags: on ? KVM_MEM_LOG_DIRTY_PAGES : 0,
      guestPhysAddr: BigInt(s.gpa),
      memorySize: BigInt(s.size),
      userspaceAddr: s.hostAddr,
    });
  }

  /**
   * The pages written since `start` or the last collect, as runs; tracking goes on from now. `quiesce`
   * and `release` hold and free the device workers around the soft-dirty read and clear.
   */
  async collect(
    quiesce: () => Promise<void>,
    release: () => void,
  ): Promise<{ runs: DirtyRuns; bytes: number }> {
    for (const p of this.#pages) p.fill(0);
    this.slots.forEach((s, i) => {
      const map = this.#kvmMaps[i];
      this.vm.getDirtyLog(s.slot, map);
      const pages = this.#pages[s.piece];
      const first = s.pieceOffset / PAGE;
      for (let w = 0; w < map.length; w++) {
        let word = map[w];
        if (word === 0n) continue;
        for (let b = 0; word !== 0n; b++, word >>= 1n) if (word & 1n) pages[first + w * 64 + b] = 1;
      }
    });
    const s = shim();
    await quiesce();
    let pagemap = -1;
    try {
      pagemap = check(s.kvs_open(cstr("/proc/self/pagemap"), O_RDONLY, 0), "open /proc/self/pagemap");
      for (let i = 0; i < this.pieces.length; i++) this.#softDirty(pagemap, this.pieces[i], this.#pages[i]);
      clearSoftDirty();
    } finally {
      release();
      if (pagemap >= 0) s.kvs_close(pagemap);
    }
    const runs: DirtyRuns = [];
    let bytes = 0;
    this.#pages.forEach((pages, piece) => {
      for (let i = 0; i < pages.length;) {
        if (!pages[i]) {
          i++;
          continue;
        }
        const start = i;
        while (i < pages.length && pages[i]) i++;
        const len = Math.min(i * PAGE, this.pieces[piece].size) - start * PAGE;
        runs.push(piece, start * PAGE, len);
        bytes += len;
      }
    });
    return { runs, bytes };
  }

  /** Marks the soft-dirty pages of piece `p` in `pages`, read from the open /proc/self/pagemap `fd`. */
  #softDirty(fd: number, p: TrackedPiece, pages: Uint8Array): void {
    const n = pages.length;
    if (!this.#pagemap || this.#pagemap.length < 2 * n) this.#pagemap = new Uint32Array(2 * n);
    const buf = this.#pagemap.subarray(0, 2 * n);
    const off = (p.hostAddr / BigInt(PAGE)) * 8n;
    const r = Number(shim().kvs_pread(fd, buf, BigInt(8 * n), off));
    if (r !== 8 * n) throw new Error(`reading /proc/self/pagemap: ${r < 0 ? `errno ${-r}` : "short read"}`);
    for (let i = 0; i < n; i++) if (buf[2 * i + 1] & SOFT_DIRTY_HIGH_BIT) pages[i] = 1;
  }
}

/** Clears this process's soft-dirty bits (every mapping's pages are write-protected again). */
function clearSoftDirty(): void {
  const s = shim();
  const fd = check(s.kvs_open(cstr("/proc/self/clear_refs"), O_WRONLY, 0), "open /proc/self/clear_refs");
  try {
    const r = Number(s.kvs_write(fd, new TextEncoder().encode("4"), 1n));
    if (r !== 1) {
      throw new Error(`clearing soft-dirty bits: errno ${-r} (the kernel needs CONFIG_MEM_SOFT_DIRTY)`);
    }
  } finally {
    s.kvs_close(fd);
  }
}
