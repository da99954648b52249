/**
 * vm.coredump: an ELF64 core file of the guest, as `crash` and `gdb` read QEMU's and Cloud Hypervisor's
 * guest dumps: one PT_NOTE with, per vCPU, an NT_PRSTATUS ("CORE") holding its general registers and a
 * "QEMU" CPU-state note (registers, segments, descriptor tables, control registers), then one PT_LOAD per
 * guest RAM region whose physical address (p_paddr, and p_vaddr) is the region's guest-physical address.
 * RAM pages that are all zero are left as holes (the file is sparse).
 */
import type { KvmRegs, KvmSegment, KvmSregs } from "../ffi/structs.ts";
import { check, cstr, shim } from "../ffi/shim.ts";
import { O_CREAT, O_TRUNC, O_WRONLY } from "../ffi/kvm_constants.ts";
import { writeSparse } from "./snapshot.ts";

/** One vCPU as the core records it. */
export interface CoreVcpu {
  id: number;
  regs: KvmRegs;
  sregs: KvmSregs;
  kernelGsBase: bigint;
}

const EHDR = 64;
const PHDR = 56;
const PT_LOAD = 1;
const PT_NOTE = 4;
const NT_PRSTATUS = 1;
const PRSTATUS_SIZE = 336;
const PRSTATUS_REGS = 112;
const QEMU_STATE_SIZE = 440;
const PAGE = 4096;

function noteSize(name: string, desc: number): number {
  return 12 + align4(name.length + 1) + align4(desc);
}
function align4(n: number): number {
  return (n + 3) & ~3;
}

/** Writes one note at `off`; returns the offset after it. The descriptor is filled by `fill`. */
function putNote(
  v: DataView,
  off: number,
  name: string,
  type: number,
  desc: number,
  fill: (at: number) => void,
) {
  v.setUint32(off, name.length + 1, true);
  v.setUint32(off + 4, desc, true);
  v.setUint32(off + 8, type, true);
  for (let i = 0; i < name.length; i++) v.setUint8(off + 12 + i, name.charCodeAt(i));
  const at = off + 12 + align4(name.length + 1);
  fill(at);
  return at + align4(desc);
}

function prstatus(v: DataView, at: number, c: CoreVcpu): void {
  v.setInt32(at + 32, c.id + 1, true); // pr_pid: the vCPU, counted from 1 as QEMU does
  const r = c.regs;
  const s = c.sregs;
  // struct user_regs_struct (x86-64), in its order.
  const order: bigint[] = [
    r.r15,
    r.r14,
    r.r13,
    r.r12,
    r.rbp,
    r.rbx,
    r.r11,
    r.r10,
    r.r9,
    r.r8,
    r.rax,
    r.rcx,
    r.rdx,
    r.rsi,
    r.rdi,
    r.rax, // orig_rax
    r.rip,
    BigInt(s.cs.selector),
    r.rflags,
    r.rsp,
    BigInt(s.ss.selector),
    s.fs.base,
    s.gs.base,
    BigInt(s.ds.selector),
    BigInt(s.es.selector),
    BigInt(s.fs.selector),
    BigInt(s.gs.selector),
  ];
  order.forEach((x, i) => v.setBigUint64(at + PRSTATUS_REGS + 8 * i, BigInt.asUintN(64, x), true));
}

function segmentFlags(g: KvmSegment): number {
  return ((g.type & 0xf) << 8) | ((g.s & 1) << 12) | ((g.dpl & 3) << 13) | ((g.present & 1) << 15) |
    ((g.avl & 1) << 20) | ((g.l & 1) << 21) | ((g.db & 1) << 22) | ((g.g & 1) << 23);
}

/** QEMU's QEMUCPUState (version 1), which `crash` reads from "QEMU" notes. */
function qemuState(v: DataView, at: number, c: CoreVcpu): void {
  const r = c.regs;
  const s = c.sregs;
  v.setUint32(at, 1, true);
  v.setUint32(at + 4, QEMU_STATE_SIZE, true);
  const gprs = [
    r.rax,
    r.rbx,
    r.rcx,
    r.rdx,
    r.rsi,
    r.rdi,
    r.rsp,
    r.rbp,
    r.r8,
    r.r9,
    r.r10,
    r.r11,
    r.r12,
    r.r13,
    r.r14,
    r.r15,
  ];
  gprs.forEach((x, i) => v.setBigUint64(at + 8 + 8 * i, x, true));
  v.setBigUint64(at + 136, r.rip, true);
  v.setBigUint64(at + 144, r.rflags, true);
  let o = at + 152;
  const seg = (selector: number, limit: number, flags: number, base: bigint) => {
    v.setUint32(o, selector, true);
    v.setUint32(o + 4, limit >>> 0, true);
    v.setUint32(o + 8, flags >>> 0, true);
    v.setBigUint64(o + 16, base, true);
    o += 24;
  };
  for (const g of [s.cs, s.ds, s.es, s.fs, s.gs, s.ss, s.ldt, s.tr]) {
    seg(g.selector, g.limit, segmentFlags(g), g.base);
  }
  seg(0, s.gdt.limit, 0, s.gdt.base);
  seg(0, s.idt.limit, 0, s.idt.base);
  for (const cr of [s.cr0, 0n, s.cr2, s.cr3, s.cr4]) {
    v.setBigUint64(o, cr, true);
    o += 8;
  }
  v.setBigUint64(o, c.kernelGsBase, true);
}

/**
 * Writes the core of a paused guest to `path`: `vcpus` as saved, `ram` the guest RAM regions (views of
 * the host mappings). Returns the bytes of RAM written (holes excluded).
 */
export function writeCoredump(
  path: string,
  vcpus: CoreVcpu[],
  ram: { gpa: number; bytes: Uint8Array }[],
): number {
  const phnum = 1 + ram.length;
  const notes = vcpus.length * (noteSize("CORE", PRSTATUS_SIZE) + noteSize("QEMU", QEMU_STATE_SIZE));
  const notesOff = EHDR + PHDR * phnum;
  const dataOff = Math.ceil((notesOff + notes) / PAGE) * PAGE;
  const head = new Uint8Array(dataOff);
  const v = new DataView(head.buffer);
  head.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]); // ELF, 64-bit, little-endian, current version
  v.setUint16(16, 4, true); // ET_CORE
  v.setUint16(18, 62, true); // EM_X86_64
  v.setUint32(20, 1, true);
  v.setBigUint64(32, BigInt(EHDR), true); // e_phoff
  v.setUint16(52, EHDR, true);
  v.setUint16(54, PHDR, true);
  v.setUint16(56, phnum, true);
  // PT_NOTE
  let ph = EHDR;
  v.setUint32(ph, PT_NOTE, true);
  v.setBigUint64(ph + 8, BigInt(notesOff), true);
  v.setBigUint64(ph + 32, BigInt(notes), true);
  v.setBigUint64(ph + 40, BigInt(notes), true);
  ph += PHDR;
  let off = dataOff;
  const places: number[] = [];
  for (const r of ram) {
    v.setUint32(ph, PT_LOAD, true);
    v.setUint32(ph + 4, 7, true); // RWX
    v.setBigUint64(ph + 8, BigInt(off), true);
    v.setBigUint64(ph + 16, BigInt(r.gpa), true); // p_vaddr
    v.setBigUint64(ph + 24, BigInt(r.gpa), true); // p_paddr
    v.setBigUint64(ph + 32, BigInt(r.bytes.length), true);
    v.setBigUint64(ph + 40, BigInt(r.bytes.length), true);
    places.push(off);
    off += r.bytes.length;
    ph += PHDR;
  }
  let n = notesOff;
  for (const c of vcpus) {
    n = putNote(v, n, "CORE", NT_PRSTATUS, PRSTATUS_SIZE, (at) => prstatus(v, at, c));
    n = putNote(v, n, "QEMU", 0, QEMU_STATE_SIZE, (at) => qemuState(v, at, c));
  }
  const s = shim();
  const fd = check(s.kvs_open(cstr(path), O_WRONLY | O_CREAT | O_TRUNC, 0o600), `open ${path}`);
  let written = 0;
  try {
    const r0 = Number(s.kvs_pwrite(fd, head, BigInt(head.length), 0n));
    if (r0 !== head.length) throw new Error(`writing ${path}: errno ${-r0}`);
    ram.forEach((r, i) => written += writeSparse(fd, r.bytes, places[i], path));
    check(s.kvs_ftruncate(fd, BigInt(off)), `truncate ${path}`);
    check(s.kvs_fsync(fd), `fsync ${path}`);
  } finally {
    s.kvs_close(fd);
  }
  return written;
}
