/**
 * ELF64 vmlinux loader with the PVH entry (Xen's direct-boot ABI, as used by Cloud Hypervisor).
 *
 * PT_LOAD segments go to their physical addresses; the entry is the 32-bit address in the
 * "Xen" ELF note of type XEN_ELFNOTE_PHYS32_ENTRY. The guest gets a struct hvm_start_info (version 1)
 * describing the command line, the initramfs module, the RSDP and the memory map.
 */

import type { GuestMemory } from "../memory.ts";
import { e820, initramfsAddress, Layout, lowRamEnd } from "../layout.ts";
import {
  cmdlineBytes,
  hex,
  KernelLoadError,
  type LoadOptions,
  type PvhEntry,
  writeChecked,
} from "./common.ts";

export const PT_LOAD = 1;
export const PT_NOTE = 4;
export const XEN_ELFNOTE_PHYS32_ENTRY = 18;
export const HVM_START_MAGIC = 0x336ec578;
const EM_X86_64 = 62;

export interface ElfSegment {
  type: number;
  flags: number;
  offset: number;
  vaddr: number;
  paddr: number;
  filesz: number;
  memsz: number;
  align: number;
}

export interface ElfNote {
  name: string;
  type: number;
  desc: Uint8Array;
}

export interface ElfInfo {
  entry: number;
  segments: ElfSegment[];
  notes: ElfNote[];
  /** PVH 32-bit physical entry point, when the image has the Xen PHYS32_ENTRY note. */
  pvhEntry?: number;
}

function u64(v: DataView, off: number, what: string): number {
  const n = v.getBigUint64(off, true);
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new KernelLoadError(`ELF ${what} ${hex(Number(n))} is too large`);
  }
  return Number(n);
}

/** Virtual addresses of a kernel are in the top 2 GiB: read them without the 2^53 check. */
function u64Lossy(v: DataView, off: number): number {
  return Number(v.getBigUint64(off, true));
}

/** Parses the notes of one PT_NOTE segment's bytes. */
export function parseNotes(bytes: Uint8Array): ElfNote[] {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const notes: ElfNote[] = [];
  const align4 = (n: number) => (n + 3) & ~3;
  let off = 0;
  while (off + 12 <= bytes.length) {
    const namesz = v.getUint32(off, true);
    const descsz = v.getUint32(off + 4, true);
    const type = v.getUint32(off + 8, true);
    const nameAt = off + 12;
    const descAt = nameAt + align4(namesz);
    const next = descAt + align4(descsz);
    if (descAt + descsz > bytes.length || namesz > bytes.length) break; // truncated note: stop
    let nameEnd = nameAt + namesz;
    while (nameEnd > nameAt && bytes[nameEnd - 1] === 0) nameEnd--;
    const name = new TextDecoder().decode(bytes.subarray(nameAt, nameEnd));
    notes.push({ name, type, desc: bytes.subarray(descAt, descAt + descsz) });
    off = next;
  }
  return notes;
}

/** Parses and validates an ELF64 x86-64 executable. */
export function parseElf(image: Uint8Array): ElfInfo {
  if (image.length < 64) throw new KernelLoadError(`not an ELF image: ${image.length} bytes is too short`);
  if (image[0] !== 0x7f || image[1] !== 0x45 || image[2] !== 0x4c || image[3] !== 0x46) {
    throw new KernelLoadError("not an ELF image: bad magic");
  }
  if (image[4] !== 2) throw new KernelLoadError("ELF image is not 64-bit (EI_CLASS != ELFCLASS64)");
  if (image[5] !== 1) throw new KernelLoadError("ELF image is not little-endian");
  const v = new DataView(image.buffer, image.byteOffset, image.byteLength);
  const machine = v.getUint16(18, true);
  if (machine !== EM_X86_64) {
    throw new KernelLoadError(`ELF image is for machine ${machine}, not x86-64 (62)`);
  }
  const entry = u64Lossy(v, 24);
  const phoff = u64(v, 32, "e_phoff");
  const phentsize = v.getUint16(54, true);
  const phnum = v.getUint16(56, true);
  if (phentsize < 56) throw new KernelLoadError(`ELF program header size ${phentsize} is too small`);
  if (phoff + phnum * phentsize > image.length) {
    throw new KernelLoadError("ELF image truncated: program headers");
  }
  const segments: ElfSegment[] = [];
  for (let i = 0; i < phnum; i++) {
    const o = phoff + i * phentsize;
    segments.push({
      type: v.getUint32(o, true),
      flags: v.getUint32(o + 4, true),
      offset: u64(v, o + 8, "p_offset"),
      vaddr: u64Lossy(v, o + 16),
      paddr: u64(v, o + 24, "p_paddr"),
      filesz: u64(v, o + 32, "p_filesz"),
      memsz: u64(v, o + 40, "p_memsz"),
      align: u64Lossy(v, o + 48),
    });
  }
  const notes: ElfNote[] = [];
  for (const s of segments) {
    if (s.type !== PT_NOTE) continue;
    if (s.offset + s.filesz > image.length) throw new KernelLoadError("ELF image truncated: note segment");
    notes.push(...parseNotes(image.subarray(s.offset, s.offset + s.filesz)));
  }
  let pvhEntry: number | undefined;
  for (const n of notes) {
    if (n.name !== "Xen" || n.type !== XEN_ELFNOTE_PHYS32_ENTRY) continue;
    const d = new DataView(n.desc.buffer, n.desc.byteOffset, n.desc.byteLength);
    if (n.desc.length >= 8) pvhEntry = Number(d.getBigUint64(0, true) & 0xffff_ffffn);
    else if (n.desc.length >= 4) pvhEntry = d.getUint32(0, true);
  }
  return { entry, segments, notes, pvhEntry };
}

/** What {@link loadPvhElf} did. */
export interface PvhLoad {
  entry: PvhEntry;
  info: ElfInfo;
  /** Lowest and highest (exclusive) physical address written by PT_LOAD segments. */
  kernelStart: number;
  kernelEnd: number;
  startInfoAddr: number;
  cmdlineAddr: number;
  initramfsAddr?: number;
  initramfsSize?: number;
}

/** The largest command line we hand a PVH kernel (Linux's COMMAND_LINE_SIZE is 2048 with NUL). */
const PVH_CMDLINE_MAX = 2047;

/**
 * Loads an ELF vmlinux with a PVH note and writes hvm_start_info. `mem` must follow {@link Layout}.
 */
export function loadPvhElf(mem: GuestMemory, image: Uint8Array, opts: LoadOptions = {}): PvhLoad {
  const info = parseElf(image);
  if (info.pvhEntry === undefined) {
    throw new KernelLoadError(
      "ELF image has no PVH entry (Xen note XEN_ELFNOTE_PHYS32_ENTRY); build the kernel with CONFIG_PVH=y",
    );
  }
  const memSize = mem.size;
  let kernelStart = Infinity;
  let kernelEnd = 0;
  for (const s of info.segments) {
    if (s.type !== PT_LOAD || s.memsz === 0) continue;
    if (s.filesz > s.memsz) throw new KernelLoadError("ELF segment has p_filesz > p_memsz");
    if (s.offset + s.filesz > image.length) throw new KernelLoadError("ELF image truncated: segment data");
    if (s.paddr < Layout.highMemStart) {
      throw new KernelLoadError(`ELF segment at ${hex(s.paddr)} overlaps the boot data below 1 MiB`);
    }
    if (!mem.contains(s.paddr, s.memsz)) {
      throw new KernelLoadError(
        `ELF segment ${hex(s.paddr)}..${hex(s.paddr + s.memsz)} does not fit in guest RAM (${memSize} bytes)`,
      );
    }
    writeChecked(mem, s.paddr, image.subarray(s.offset, s.offset + s.filesz), "ELF segment");
    mem.fill(s.paddr + s.filesz, s.memsz - s.filesz, 0);
    kernelStart = Math.min(kernelStart, s.paddr);
    kernelEnd = Math.max(kernelEnd, s.paddr + s.memsz);
  }
  if (kernelEnd === 0) throw new KernelLoadError("ELF image has no loadable segment");

  const si = Layout.pvhStartInfoAddr;
  mem.fill(si, Layout.pvhMemmapAddr + Layout.pvhMemmapMax * 24 - si, 0);

  const cmd = cmdlineBytes(opts.cmdline ?? "", PVH_CMDLINE_MAX);
  writeChecked(mem, Layout.cmdlineAddr, cmd, "kernel command line");

  let initramfsAddr: number | undefined;
  let nrModules = 0;
  const initrd = opts.initramfs;
  if (initrd && initrd.length > 0) {
    const addr = initramfsAddress(memSize, initrd.length, lowRamEnd(memSize), kernelEnd);
    if (addr === null) {
      throw new KernelLoadError(
        `initramfs of ${initrd.length} bytes does not fit between the kernel (ends ${hex(kernelEnd)}) ` +
          `and the end of low RAM (${hex(lowRamEnd(memSize))}); give the VM more memory`,
      );
    }
    writeChecked(mem, addr, initrd, "initramfs");
    const m = Layout.pvhModlistAddr;
    mem.writeU64(m, addr);
    mem.writeU64(m + 8, initrd.length);
    mem.writeU64(m + 16, 0);
    mem.writeU64(m + 24, 0);
    nrModules = 1;
    initramfsAddr = addr;
  }

  const map = e820(memSize);
  if (map.length > Layout.pvhMemmapMax) throw new KernelLoadError("too many memory map entries");
  map.forEach((e, i) => {
    const at = Layout.pvhMemmapAddr + i * 24;
    mem.writeU64(at, e.addr);
    mem.writeU64(at + 8, e.size);
    mem.writeU32(at + 16, e.type);
    mem.writeU32(at + 20, 0);
  });

  mem.writeU32(si, HVM_START_MAGIC);
  mem.writeU32(si + 4, 1); // version
  mem.writeU32(si + 8, 0); // flags
  mem.writeU32(si + 12, nrModules);
  mem.writeU64(si + 16, nrModules ? Layout.pvhModlistAddr : 0);
  mem.writeU64(si + 24, Layout.cmdlineAddr);
  mem.writeU64(si + 32, opts.rsdpAddr ?? Layout.rsdpAddr);
  mem.writeU64(si + 40, Layout.pvhMemmapAddr);
  mem.writeU32(si + 48, map.length);
  mem.writeU32(si + 52, 0);

  return {
    entry: { kind: "pvh", rip: info.pvhEntry, rbx: si },
    info,
    kernelStart,
    kernelEnd,
    startInfoAddr: si,
    cmdlineAddr: Layout.cmdlineAddr,
    initramfsAddr,
    initramfsSize: initrd?.length,
  };
}
