/**
 * The host side of virtio-pmem (main thread): opens the backing file, maps it, and plugs the mapping
 * into guest physical memory as a KVM memory slot of its own. The device worker only gets the fd, for
 * flushes (fsync).
 *
 * Placement follows Cloud Hypervisor: each region is taken from the start of the PCI segment's 64-bit
 * MMIO window (the host bridge's 64-bit aperture in the DSDT, which also holds the guest's view of
 * device memory), 2 MiB aligned, one after the other. dvmm places its BARs in the 32-bit window, so the
 * regions do not meet a BAR; {@link PmemRegions.end} says where device memory ends in the 64-bit one.
 *
 * - `discard_writes=off`: the file is opened read-write and mapped MAP_SHARED: guest stores land in the
 *   host page cache and a guest flush (fsync) makes them durable.
 * - `discard_writes=on`: the file is opened read-only and mapped MAP_PRIVATE: the guest may write, but
 *   its writes go to private copies of the pages and never reach the file.
 * - `file` naming a directory: an unnamed temporary file (O_TMPFILE) of `size` bytes in it.
 *
 * The size is the file's (or `size`, when given), and must be a non-zero multiple of 2 MiB, as Cloud
 * Hypervisor requires. A `size` beyond the end of a file is refused: guest accesses past the end of a
 * mapped file cannot be served (Cloud Hypervisor maps it anyway and faults on access).
 */
import type { VmFd } from "../../ffi/kvm.ts";
import { check, checkBig, cstr, shim } from "../../ffi/shim.ts";
import {
  MAP_NORESERVE,
  MAP_PRIVATE,
  MAP_SHARED,
  O_CLOEXEC,
  O_NONBLOCK,
  O_RDONLY,
  O_RDWR,
  PROT_READ,
  PROT_WRITE,
} from "../../ffi/kvm_constants.ts";
import type { PmemConfig } from "../../vmm/vm_config.ts";
import { PMEM_ALIGN, type PmemBackend } from "./pmem.ts";

/** open(2) O_TMPFILE (includes O_DIRECTORY). */
const O_TMPFILE = 0o20200000;
/** lseek(2) whence: the end of the file. */
const SEEK_END = 2;

/**
 * First KVM memory slot used for pmem regions: clear of guest RAM's slots (0 and up, one per RAM
 * region) so the two numberings never meet.
 */
export const PMEM_FIRST_SLOT = 32;
/** KVM slots PMEM_FIRST_SLOT.. are pmem's, up to the ACPI memory hotplug slots (64..). */
export const PMEM_MAX_REGIONS = 32;

/** One mapped pmem region. */
export interface PmemRegion {
  /** The device's identifier. */
  id: string;
  /** Backing file (read-only with discard_writes). */
  fd: number;
  gpa: number;
  size: number;
  hostAddr: bigint;
  slot: number;
  discardWrites: boolean;
}

/** Where the next region of `size` bytes goes: 2 MiB aligned from `next`, inside the window; null if full. */
export function placePmem(
  window: { start: number; size: number },
  next: number,
  size: number,
): number | null {
  const at = Math.ceil(Math.max(next, window.start) / PMEM_ALIGN) * PMEM_ALIGN;
  if (!Number.isSafeInteger(at + size) || at + size > window.start + window.size) return null;
  return at;
}

/** The region size for a file of `fileSize` bytes and an optional `size=`; throws when unusable. */
export function pmemSize(what: string, fileSize: number, size: number | undefined, isDir: boolean): number {
  let s: number;
  if (isDir) {
    if (size === undefined) throw new Error(`${what}: a directory needs size=`);
    s = size;
  } else {
    s = size ?? fileSize;
    if (s > fileSize) {
      throw new Error(`${what}: size ${s} is larger than the file (${fileSize} bytes)`);
    }
  }
  if (s === 0) throw new Error(`${what}: the region would be empty`);
  if (s % PMEM_ALIGN !== 0) throw new Error(`${what}: size ${s} is not a multiple of 2 MiB`);
  return s;
}

/**
 * Opens the backing file once; returns its fd and the region size. It must be a regular file, a block
 * device or a directory (a temporary file in it): a FIFO would block the open, a character device has no
 * size to map. The open is non-blocking and the size comes from the open descriptor, so a FIFO put in the
 * file's place after the check fails (lseek) instead of hanging.
 */
export function openPmemFile(p: PmemConfig, what: string): { fd: number; size: number } {
  const s = shim();
  let st: Deno.FileInfo;
  try {
    st = Deno.statSync(p.file);
  } catch (e) {
    throw new Error(`${what}: ${p.file}: ${(e as Error).message.replace(/, stat '.*'$/, "")}`);
  }
  if (!st.isDirectory && !st.isFile && !st.isBlockDevice) {
    throw new Error(`${what}: ${p.file} is not a regular file, a block device or a directory`);
  }
  const flags = st.isDirectory ? O_TMPFILE | O_RDWR : (p.discard_writes ? O_RDONLY : O_RDWR) | O_NONBLOCK;
  const fd = check(s.kvs_open(cstr(p.file), flags | O_CLOEXEC, 0o600), `${what}: open ${p.file}`);
  try {
    if (st.isDirectory) {
      const size = pmemSize(what, 0, p.size, true);
      check(s.kvs_ftruncate(fd, size), `${what}: size the temporary file`);
      return { fd, size };
    }
    // Block devices report 0 in stat: the end of the open file is its size.
    const fileSize = check(s.kvs_lseek(fd, 0n, SEEK_END), `${what}: the size of ${p.file}`);
    return { fd, size: pmemSize(what, fileSize, p.size, false) };
  } catch (e) {
    s.kvs_close(fd);
    throw e;
  }
}

/** The pmem regions of one VM (main thread). */
export class PmemRegions {
  readonly regions: PmemRegion[] = [];
  #next: number;

  constructor(readonly vm: VmFd, readonly window: { start: number; size: number }) {
    this.#next = this.window.start;
  }

  /** First address after the pmem regions in the 64-bit window. */
  get end(): number {
    return this.#next;
  }

  /** First fit in the window: a removed region's range is used again. */
  #place(size: number): number | null {
    const starts = [this.window.start, ...this.regions.map((r) => r.gpa + r.size)].sort((a, b) => a - b);
    for (const from of starts) {
      const gpa = placePmem(this.window, from, size);
      if (gpa === null) continue;
      if (this.regions.every((r) => gpa + size <= r.gpa || gpa >= r.gpa + r.size)) return gpa;
    }
    return null;
  }

  /** Opens, maps and plugs in the region of device `id`. */
  add(p: PmemConfig, id: string): PmemRegion {
    const what = `pmem ${id}`;
    const s = shim();
    const { fd, size } = openPmemFile(p, what);
    let hostAddr = 0n;
    try {
      const gpa = this.#place(size);
      if (gpa === null) throw new Error(`${what}: no room for ${size} bytes in the 64-bit device window`);
      const flags = (p.discard_writes ? MAP_PRIVATE : MAP_SHARED) | MAP_NORESERVE;
      hostAddr = checkBig(s.kvs_mmap(0, size, PROT_READ | PROT_WRITE, flags, fd, 0), `${what}: mmap`);
      let slot = PMEM_FIRST_SLOT;
      while (this.regions.some((r) => r.slot === slot)) slot++;
      if (slot >= PMEM_FIRST_SLOT + PMEM_MAX_REGIONS) {
        throw new Error(`${what}: at most ${PMEM_MAX_REGIONS} pmem devices per VM`);
      }
      this.vm.setUserMemoryRegion({
        slot,
        flags: 0,
        guestPhysAddr: BigInt(gpa),
        memorySize: BigInt(size),
        userspaceAddr: hostAddr,
      });
      const r: PmemRegion = { id, fd, gpa, size, hostAddr, slot, discardWrites: p.discard_writes };
      this.regions.push(r);
      this.#next = Math.max(this.#next, gpa + size);
      return r;
    } catch (e) {
      if (hostAddr !== 0n) s.kvs_munmap(hostAddr, size);
      s.kvs_close(fd);
      throw e;
    }
  }

  /** Unplugs and unmaps the region of device `id` and closes its file (hot removal); no-op if absent. */
  remove(id: string): void {
    const i = this.regions.findIndex((r) => r.id === id);
    if (i >= 0) this.#release(this.regions.splice(i, 1));
  }

  /** Unplugs and unmaps every region and closes the files (after the vCPUs and workers stopped). */
  close(): void {
    this.#release(this.regions.splice(0));
  }

  #release(regions: PmemRegion[]): void {
    const s = shim();
    for (const r of regions) {
      try {
        this.vm.setUserMemoryRegion({
          slot: r.slot,
          flags: 0,
          guestPhysAddr: BigInt(r.gpa),
          memorySize: 0n,
          userspaceAddr: r.hostAddr,
        });
      } catch { /* the VM is going away anyway */ }
      s.kvs_munmap(r.hostAddr, r.size);
      s.kvs_close(r.fd);
    }
  }
}

/** Flushes through the shim (device worker): fsync of an fd the worker does not own. */
export class FdPmemBackend implements PmemBackend {
  constructor(readonly fd: number) {}
  flush(): void {
    const r = Number(shim().kvs_fsync(this.fd));
    if (r < 0) throw new Error(`pmem fsync: errno ${-r}`);
  }
}
