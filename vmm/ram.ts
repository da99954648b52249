/**
 * Guest RAM as the config describes it: the default memory (`memory.size`, zone `mem0`) and the memory
 * zones (`memory.zones`), each with its own backing (anonymous, shared memfd, a file or a directory,
 * huge pages), laid out one after the other over the guest's RAM regions (below the 32-bit hole, then
 * from 4 GiB). Hotplug space comes after RAM: the default memory's `hotplug_size` (ACPI slots or a
 * virtio-mem region) and each zone's `hotplug_size` (a virtio-mem region of its own, as Cloud Hypervisor).
 */
import { cstr, shim } from "../ffi/shim.ts";
import { check } from "../ffi/shim.ts";
import { type HostMapping, mapAnonymous, mapFd, mapMemfd, unmap } from "../ffi/kvm.ts";
import { MADV_POPULATE_WRITE, O_CLOEXEC, O_RDWR } from "../ffi/kvm_constants.ts";
import { hotplugRegion, ramRegions } from "./layout.ts";
import type { MemoryConfig } from "./vm_config.ts";
import { MEM_REGION_ALIGN } from "../devices/virtio/mem.ts";

/** The default memory's zone id, as Cloud Hypervisor names it. */
export const DEFAULT_ZONE = "mem0";

/** One backing of guest RAM. */
export interface RamPart {
  id: string;
  size: number;
  shared: boolean;
  hugepages: boolean;
  /** A file (or a directory for an unnamed file) backing the part. */
  file?: string;
  /** virtio-mem: bytes that may be plugged beyond `size` (the zone's hotplug_size). */
  hotplugSize: number;
  /** virtio-mem: bytes plugged at boot (hotplugged_size). */
  hotpluggedSize: number;
  /** madvise: KSM merging, transparent huge pages, all pages faulted in at boot. */
  mergeable: boolean;
  thp: boolean;
  prefault: boolean;
  /** Hotplug space: shared huge pages are not reserved when mapped (only what gets plugged is used). */
  noReserve?: boolean;
}

/** A piece of a part placed in guest-physical memory (one KVM slot). */
export interface RamChunk {
  gpa: number;
  size: number;
  part: number;
  /** Offset of the chunk in its part's backing. */
  offset: number;
}

/** The parts of guest RAM: the default memory (if any), then the zones, in order. */
export function ramParts(m: MemoryConfig): RamPart[] {
  const out: RamPart[] = [];
  const virtioMem = m.hotplug_method === "VirtioMem";
  if (m.size > 0) {
    out.push({
      id: DEFAULT_ZONE,
      size: m.size,
      shared: m.shared,
      hugepages: m.hugepages,
      hotplugSize: virtioMem ? m.hotplug_size ?? 0 : 0,
      hotpluggedSize: virtioMem ? m.hotplugged_size ?? 0 : 0,
      mergeable: m.mergeable,
      thp: m.thp,
      prefault: m.prefault,
    });
  }
  for (const z of m.zones ?? []) {
    out.push({
      id: z.id,
      size: z.size,
      shared: z.shared,
      hugepages: z.hugepages,
      file: z.file,
      hotplugSize: z.hotplug_size ?? 0,
      hotpluggedSize: z.hotplugged_size ?? 0,
      mergeable: z.mergeable,
      thp: m.thp,
      prefault: z.prefault,
    });
  }
  return out;
}

/** Bytes of guest RAM at boot (default memory plus zones). */
export function ramSize(m: MemoryConfig): number {
  return m.size + (m.zones ?? []).reduce((n, z) => n + z.size, 0);
}

/** Address space after RAM kept for hotplug: ACPI's or virtio-mem's regions, in 128 MiB multiples. */
export function hotplugSpace(m: MemoryConfig): number {
  let n = m.hotplug_size ?? 0;
  for (const z of m.zones ?? []) n += alignUp(z.hotplug_size ?? 0, MEM_REGION_ALIGN);
  return n;
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/** Lays the parts over the RAM regions: consecutive chunks, a part split where a region ends. */
export function ramChunks(parts: RamPart[]): RamChunk[] {
  const total = parts.reduce((n, p) => n + p.size, 0);
  const out: RamChunk[] = [];
  let part = 0, used = 0;
  for (const r of ramRegions(total)) {
    let gpa = r.gpa, left = r.size;
    while (left > 0 && part < parts.length) {
      const n = Math.min(left, parts[part].size - used);
      out.push({ gpa, size: n, part, offset: used });
      gpa += n;
      left -= n;
      used += n;
      if (used === parts[part].size) {
        part++;
        used = 0;
      }
    }
  }
  return out;
}

/** A virtio-mem region of a part: placed after RAM (and after the default memory's ACPI hotplug space). */
export interface VirtioMemPlacement {
  part: number;
  id: string;
  gpa: number;
  size: number;
  requested: number;
}

/** Where each part with a virtio-mem hotplug size gets its region, 128 MiB aligned, one after another. */
export function virtioMemPlacements(m: MemoryConfig, parts: RamPart[]): VirtioMemPlacement[] {
  const out: VirtioMemPlacement[] = [];
  let at = hotplugRegion(ramSize(m), 0).start;
  if (m.hotplug_method === "Acpi") at += m.hotplug_size ?? 0;
  parts.forEach((p, part) => {
    const size = Math.floor(p.hotplugSize / MEM_REGION_ALIGN) * MEM_REGION_ALIGN;
    if (size === 0) return;
    at = alignUp(at, MEM_REGION_ALIGN);
    out.push({ part, id: p.id, gpa: at, size, requested: Math.min(p.hotpluggedSize, size) });
    at += size;
  });
  return out;
}

const O_TMPFILE = 0o20000000 | 0o200000; // __O_TMPFILE | O_DIRECTORY

const MADV_MERGEABLE = 12;
const MADV_NOHUGEPAGE = 15;

/**
 * Maps a part's backing (a file or directory, a memfd with `shared`, or anonymous memory) and applies its
 * memory options: `mergeable` (KSM), `thp=off` (no transparent huge pages for anonymous RAM; with `on`
 * the host's THP policy applies), `prefault` (every page faulted in now).
 */
export function mapPart(p: RamPart, name: string): HostMapping {
  const m = mapBacking(p, name);
  const advise = (advice: number, what: string) => {
    const r = Number(shim().kvs_madvise(m.hostAddr, p.size, advice));
    if (r < 0) throw new Error(`memory ${p.id}: ${what} failed (errno ${-r})`);
  };
  try {
    if (p.mergeable) advise(MADV_MERGEABLE, "mergeable=on (KSM)");
    // thp=off keeps transparent huge pages away from anonymous RAM. thp=on (the default) leaves the host's
    // THP policy in force rather than MADV_HUGEPAGE: with the common defrag=madvise setting that flag makes
    // every fault of guest RAM compact memory synchronously, which stalled guests in the nested lab.
    if (!p.thp && !p.hugepages && !p.shared && p.file === undefined) {
      shim().kvs_madvise(m.hostAddr, p.size, MADV_NOHUGEPAGE);
    }
    if (p.prefault) advise(MADV_POPULATE_WRITE, "prefault=on");
  } catch (e) {
    unmap(m);
    throw e;
  }
  return m;
}

function mapBacking(p: RamPart, name: string): HostMapping {
  if (p.file === undefined) {
    return p.shared
      ? mapMemfd(p.size, name, { hugepages: p.hugepages })
      : mapAnonymous(p.size, { hugepages: p.hugepages });
  }
  let isDir = false;
  try {
    isDir = Deno.statSync(p.file).isDirectory;
  } catch (e) {
    throw new Error(`memory zone ${p.id}: ${p.file}: ${(e as Error).message}`);
  }
  const s = shim();
  const flags = isDir ? O_TMPFILE | O_RDWR : O_RDWR;
  const fd = check(s.kvs_open(cstr(p.file), flags | O_CLOEXEC, 0o600), `memory zone ${p.id}: open ${p.file}`);
  try {
    const size = isDir ? 0 : Deno.statSync(p.file).size;
    if (size < p.size) check(s.kvs_ftruncate(fd, p.size), `memory zone ${p.id}: size ${p.file}`);
    return { ...mapFd(fd, p.size, 0), fd };
  } catch (e) {
    s.kvs_close(fd);
    throw e;
  }
}
