/**
 * The snapshot format: a directory holding
 *
 * - `config.json`: the VM config as it stood (hot-plugged devices and resizes included);
 * - `state.json`: {@link SnapshotState}, versioned: vCPUs, the in-kernel irqchip, PIT and clock, every
 *   device's shared state and each virtio queue's position;
 * - `memory`: guest memory, one range after the other (each 2 MiB aligned, so a range can be mapped
 *   straight from the file), written sparse: pages that are all zero (never touched) are holes.
 *
 * A dvmm loads snapshots of its own format version and older ones it knows; a newer or foreign one is
 * refused by name.
 */
import { check, cstr, shim } from "../ffi/shim.ts";
import { O_CREAT, O_RDONLY, O_TRUNC, O_WRONLY } from "../ffi/kvm_constants.ts";
import type { VcpuState } from "./vcpu_state.ts";
import { DVMM_VERSION } from "./version.ts";

export const SNAPSHOT_FORMAT = "dvmm-snapshot";
/** Bumped whenever what is saved changes; loading handles every version up to this one. */
export const SNAPSHOT_VERSION = 1;

export const CONFIG_FILE = "config.json";
export const STATE_FILE = "state.json";
export const MEMORY_FILE = "memory";

const PAGE = 4096;
/** Ranges start at 2 MiB boundaries in the memory file. */
const RANGE_ALIGN = 2 << 20;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const ENXIO = 6;

/** One stretch of guest memory in the memory file. */
export interface MemoryRange {
  /** What it is: `ram:<zone>`, `hotplug` (ACPI slots), `virtio-mem:<zone>`. */
  name: string;
  size: number;
  /** Byte offset in the memory file. */
  offset: number;
}

/** A virtio device's place and queue positions. */
export interface VirtioState {
  id: string;
  kind: string;
  slot: number;
  segment: number;
  gsiBase: number;
  /** Per queue: [next available index, next used index], or null when the queue was not live. */
  queues: ([number, number] | null)[];
  /** The device's own words (virtio-net: queue pairs in use). */
  words: number[];
}

/** state.json */
export interface SnapshotState {
  format: typeof SNAPSHOT_FORMAT;
  version: number;
  /** The dvmm that wrote it. */
  dvmm: string;
  vcpus: VcpuState[];
  vm: {
    /** kvmclock (ns), as KVM_GET_CLOCK read it. */
    clock: string;
    /** KVM_GET_IRQCHIP of PIC master, PIC slave and IOAPIC (raw, base64). */
    irqchip: string[];
    /** KVM_GET_PIT2 (raw, base64). */
    pit2: string;
  };
  /** Every device's shared state by path (see platform shared state), base64. */
  devices: Record<string, string>;
  virtio: VirtioState[];
  memory: MemoryRange[];
}

/** Where a restored VM comes from. */
export interface RestoreSource {
  state: SnapshotState;
  /** The snapshot's memory file, open read-only (the caller closes it once boot has returned). */
  memoryFd: number;
  /** Map plain RAM from the memory file copy-on-write (pages read when first touched) instead of copying. */
  onDemand: boolean;
  /** Fault all of RAM in before the VM runs. */
  prefault: boolean;
  /** Local migration: the sender's memory by piece name, mapped shared as this VM's (owned by the VM). */
  memfds?: Record<string, number>;
}

/** The local path of a `file://` URL (the only kind dvmm snapshots to); `field` names it in errors. */
export function fileUrlPath(url: string, field: string): string {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new Error(`${field} '${url}' is not a URL (file:///path)`);
  }
  if (u.protocol !== "file:") {
    throw new Error(`${field} '${url}': only file:// URLs are supported`);
  }
  if (u.host !== "" && u.host !== "localhost") throw new Error(`${field} '${url}': the host must be empty`);
  const path = decodeURIComponent(u.pathname);
  if (path === "" || path === "/") throw new Error(`${field} '${url}' names no directory`);
  return path;
}

/** Checks a loaded state.json names this format and a version this dvmm reads. */
export function checkState(s: unknown, where: string): SnapshotState {
  const st = s as Partial<SnapshotState> | null;
  if (!st || typeof st !== "object" || st.format !== SNAPSHOT_FORMAT) {
    throw new Error(`${where} is not a dvmm snapshot (format '${st?.format ?? "none"}')`);
  }
  if (typeof st.version !== "number" || st.version < 1 || st.version > SNAPSHOT_VERSION) {
    throw new Error(
      `${where}: snapshot format version ${st.version} (written by dvmm ${st.dvmm}) is not readable by ` +
        `dvmm ${DVMM_VERSION}, which reads versions 1 to ${SNAPSHOT_VERSION}`,
    );
  }
  if (
    !Array.isArray(st.vcpus) || !st.vm || !st.devices || !Array.isArray(st.virtio) ||
    !Array.isArray(st.memory)
  ) {
    throw new Error(`${where}: incomplete snapshot state`);
  }
  return st as SnapshotState;
}

export function newState(): SnapshotState {
  return {
    format: SNAPSHOT_FORMAT,
    version: SNAPSHOT_VERSION,
    dvmm: DVMM_VERSION,
    vcpus: [],
    vm: { clock: "0", irqchip: [], pit2: "" },
    devices: {},
    virtio: [],
    memory: [],
  };
}

/**
 * Collects the SharedArrayBuffers of a structured-cloneable descriptor tree by path (`a.b[id].c`):
 * device state lives in them. Keys in `skip` are left out (host-side control words).
 */
export function sharedBuffers(
  root: unknown,
  skip: ReadonlySet<string>,
  prefix = "",
  out = new Map<string, SharedArrayBuffer>(),
): Map<string, SharedArrayBuffer> {
  if (root instanceof SharedArrayBuffer) {
    out.set(prefix, root);
    return out;
  }
  if (root === null || typeof root !== "object" || ArrayBuffer.isView(root) || root instanceof ArrayBuffer) {
    return out;
  }
  if (Array.isArray(root)) {
    root.forEach((v, i) => {
      const id = v && typeof v === "object" && typeof (v as { id?: unknown }).id === "string"
        ? (v as { id: string }).id
        : String(i);
      sharedBuffers(v, skip, `${prefix}[${id}]`, out);
    });
    return out;
  }
  for (const [k, v] of Object.entries(root)) {
    if (skip.has(k)) continue;
    sharedBuffers(v, skip, prefix ? `${prefix}.${k}` : k, out);
  }
  return out;
}

/** A guest memory stretch to save: its bytes (a view of the host mapping) and, for a memfd, the fd. */
export interface MemorySource {
  name: string;
  bytes: Uint8Array;
  /** The memfd behind it (its holes are found with SEEK_DATA instead of reading them). */
  fd?: number;
  /** Offset of `bytes` in `fd`. */
  fdOffset?: number;
}

/** Whether the 4 KiB page at byte offset `off` of `w` (an Int32 view of guest memory) is all zero. */
export function zeroPage(w: Int32Array, off: number): boolean {
  const end = (off + PAGE) / 4;
  for (let i = off / 4; i < end; i += 8) {
    if ((w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7]) !== 0) {
      return false;
    }
  }
  return true;
}

/** pwrite of all of `bytes` at `off`. */
function pwriteAll(fd: number, bytes: Uint8Array, off: number, what: string): void {
  let done = 0;
  while (done < bytes.length) {
    const n = Math.min(bytes.length - done, 1 << 30);
    const r = Number(shim().kvs_pwrite(fd, bytes.subarray(done, done + n), BigInt(n), BigInt(off + done)));
    if (r < 0) throw new Error(`writing ${what}: errno ${-r}${-r === 28 ? " (no space left)" : ""}`);
    done += r;
  }
}

/**
 * Writes `bytes` (a page-aligned stretch of guest memory) at `offset` of `fd`, leaving its all-zero pages
 * as holes; only `extents` (byte ranges of `bytes`) are looked at. Returns the bytes written.
 */
export function writeSparse(
  fd: number,
  bytes: Uint8Array,
  offset: number,
  what: string,
  extents: [number, number][] = [[0, bytes.length]],
): number {
  const size = bytes.length;
  const w = new Int32Array(bytes.buffer, bytes.byteOffset, size / 4);
  let written = 0;
  for (const [a, b] of extents) {
    let p = Math.floor(a / PAGE) * PAGE;
    while (p < b) {
      while (p < b && zeroPage(w, p)) p += PAGE;
      const runStart = p;
      while (p < b && !zeroPage(w, p)) p += PAGE;
      if (p > runStart) {
        const end = Math.min(p, size);
        pwriteAll(fd, bytes.subarray(runStart, end), offset + runStart, what);
        written += end - runStart;
      }
    }
  }
  return written;
}

/** Data extents of `fd` in [start, end) (SEEK_DATA/SEEK_HOLE); the whole range if the fd cannot tell. */
function dataExtents(fd: number, start: number, end: number): [number, number][] {
  const s = shim();
  const out: [number, number][] = [];
  let at = start;
  while (at < end) {
    const d = Number(s.kvs_lseek(fd, BigInt(at), SEEK_DATA));
    if (d === -ENXIO) break; // no data after `at`
    if (d < 0) return [[start, end]];
    if (d >= end) break;
    let h = Number(s.kvs_lseek(fd, BigInt(d), SEEK_HOLE));
    if (h < 0) h = end;
    out.push([d, Math.min(h, end)]);
    at = h;
  }
  return out;
}

/**
 * Writes guest memory to `path` (created or truncated), sparse: within each range only the pages that
 * are not all zero are written (for a memfd, only its allocated extents are even read). Returns where
 * each range went.
 */
export function writeMemory(
  path: string,
  sources: MemorySource[],
): { ranges: MemoryRange[]; written: number } {
  const s = shim();
  const fd = check(s.kvs_open(cstr(path), O_WRONLY | O_CREAT | O_TRUNC, 0o600), `open ${path}`);
  const ranges: MemoryRange[] = [];
  let written = 0;
  try {
    let offset = 0;
    for (const src of sources) {
      offset = Math.ceil(offset / RANGE_ALIGN) * RANGE_ALIGN;
      const size = src.bytes.length;
      ranges.push({ name: src.name, size, offset });
      const extents = src.fd !== undefined
        ? dataExtents(src.fd, src.fdOffset ?? 0, (src.fdOffset ?? 0) + size).map(([a, b]) =>
          [a - (src.fdOffset ?? 0), b - (src.fdOffset ?? 0)] as [number, number]
        )
        : [[0, size] as [number, number]];
      written += writeSparse(fd, src.bytes, offset, path, extents);
      offset += size;
    }
    // The file's length covers the last range even when it ends in a hole.
    check(s.kvs_ftruncate(fd, BigInt(offset)), `truncate ${path}`);
    check(s.kvs_fsync(fd), `fsync ${path}`);
  } finally {
    s.kvs_close(fd);
  }
  return { ranges, written };
}

/** Opens a snapshot's memory file read-only (owner closes it). */
export function openMemory(path: string): number {
  return check(shim().kvs_open(cstr(path), O_RDONLY, 0), `open ${path}`);
}

/**
 * Copies range `r` of the memory file into `dest` (a view of fresh, zeroed guest memory): only the
 * file's data extents are read, holes stay zero.
 */
export function readRange(fd: number, r: MemoryRange, dest: Uint8Array): void {
  if (dest.length !== r.size) {
    throw new Error(`memory range ${r.name}: ${r.size} bytes saved, ${dest.length} now`);
  }
  for (const [a, b] of dataExtents(fd, r.offset, r.offset + r.size)) {
    let done = a;
    while (done < b) {
      const n = Math.min(b - done, 1 << 30);
      const got = Number(
        shim().kvs_pread(fd, dest.subarray(done - r.offset, done - r.offset + n), BigInt(n), BigInt(done)),
      );
      if (got < 0) throw new Error(`reading memory range ${r.name}: errno ${-got}`);
      if (got === 0) throw new Error(`reading memory range ${r.name}: the memory file is short`);
      done += got;
    }
  }
}
