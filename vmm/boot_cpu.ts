/**
 * Initial state of the boot CPU for a loader's entry state.
 *
 * - `linux64`: long mode with paging: identity-mapped page tables for the first 4 GiB (2 MiB pages),
 *   a GDT with __BOOT_CS = 0x10 and __BOOT_DS = 0x18, RSI = zero page, interrupts off.
 * - `pvh`: 32-bit protected mode, paging off, flat CS (0x08) / data (0x18), EBX = hvm_start_info.
 *
 * Both write the GDT (and for linux64 the page tables) into guest memory at Layout addresses.
 */

import type { KvmRegs, KvmSegment, KvmSregs } from "../ffi/structs.ts";
import type { GuestMemory } from "./memory.ts";
import { Layout } from "./layout.ts";
import type { BootEntry } from "./loader/common.ts";

export const CR0_PE = 1n << 0n;
export const CR0_ET = 1n << 4n;
export const CR0_PG = 1n << 31n;
export const CR4_PAE = 1n << 5n;
export const EFER_LME = 1n << 8n;
export const EFER_LMA = 1n << 10n;
/** IA32_APIC_BASE for the BSP: default base, global enable (bit 11), BSP (bit 8). */
export const APIC_BASE_BSP = BigInt(Layout.lapicAddr) | (1n << 11n) | (1n << 8n);

export const SEL_CODE32 = 0x08;
export const SEL_CODE64 = 0x10; // __BOOT_CS
export const SEL_DATA = 0x18; // __BOOT_DS
export const SEL_TSS = 0x20;

/** Page table entry bits. */
const PTE_P = 1n;
const PTE_RW = 2n;
const PTE_PS = 0x80n;

/**
 * A GDT descriptor from base, 20-bit limit, access byte (P, DPL, S, type) and flags nibble
 * (G, D/B, L, AVL).
 */
export function gdtEntry(access: number, flags: number, base: number, limit: number): bigint {
  const b = BigInt(base >>> 0);
  const l = BigInt(limit & 0xfffff);
  return (l & 0xffffn) | ((b & 0xff_ffffn) << 16n) | (BigInt(access & 0xff) << 40n) | ((l >> 16n) << 48n) |
    (BigInt(flags & 0xf) << 52n) | ((b >> 24n) << 56n);
}

/** The kvm_segment a selector loads from a GDT descriptor. */
export function segmentFromGdt(selector: number, d: bigint): KvmSegment {
  const access = Number((d >> 40n) & 0xffn);
  const flags = Number((d >> 52n) & 0xfn);
  const rawLimit = Number((d & 0xffffn) | (((d >> 48n) & 0xfn) << 16n));
  const g = (flags >> 3) & 1;
  const present = access >> 7;
  return {
    base: ((d >> 16n) & 0xff_ffffn) | (((d >> 56n) & 0xffn) << 24n),
    limit: g ? rawLimit * 4096 + 0xfff : rawLimit,
    selector,
    type: access & 0xf,
    present,
    dpl: (access >> 5) & 3,
    db: (flags >> 2) & 1,
    s: (access >> 4) & 1,
    l: (flags >> 1) & 1,
    g,
    avl: flags & 1,
    unusable: present ? 0 : 1,
  };
}

/** The boot GDT, indexed by selector / 8 (the TSS descriptor takes two slots in long mode). */
export function bootGdt(): bigint[] {
  return [
    0n,
    gdtEntry(0x9b, 0xc, 0, 0xfffff), // 0x08: code, 32-bit, flat
    gdtEntry(0x9b, 0xa, 0, 0xfffff), // 0x10: code, 64-bit
    gdtEntry(0x93, 0xc, 0, 0xfffff), // 0x18: data, flat
    gdtEntry(0x8b, 0x0, 0, 0x67), // 0x20: busy TSS (low half)
    0n, // 0x28: TSS high half (base bits 63:32)
  ];
}

/** Writes the boot GDT at Layout.gdtAddr; returns the entries. */
export function writeGdt(mem: GuestMemory): bigint[] {
  const gdt = bootGdt();
  gdt.forEach((e, i) => mem.writeU64(Layout.gdtAddr + 8 * i, e));
  mem.fill(Layout.idtAddr, 8, 0);
  return gdt;
}

/**
 * Writes PML4 -> PDPT -> Layout.pdCount page directories identity-mapping
 * [0, pdCount GiB) with 2 MiB pages. Returns the value for CR3.
 */
export function writeIdentityPageTables(mem: GuestMemory): number {
  mem.fill(Layout.pml4Addr, 4096, 0);
  mem.fill(Layout.pdptAddr, 4096, 0);
  mem.writeU64(Layout.pml4Addr, BigInt(Layout.pdptAddr) | PTE_P | PTE_RW);
  for (let i = 0; i < Layout.pdCount; i++) {
    const pd = Layout.pdAddr + i * 4096;
    mem.writeU64(Layout.pdptAddr + 8 * i, BigInt(pd) | PTE_P | PTE_RW);
    const pdBytes = mem.slice(pd, 4096);
    const v = new DataView(pdBytes.buffer, pdBytes.byteOffset, 4096);
    for (let j = 0; j < 512; j++) {
      const phys = (BigInt(i) << 30n) | (BigInt(j) << 21n);
      v.setBigUint64(8 * j, phys | PTE_P | PTE_RW | PTE_PS, true);
    }
  }
  return Layout.pml4Addr;
}

function zeroRegs(): KvmRegs {
  return {
    rax: 0n,
    rbx: 0n,
    rcx: 0n,
    rdx: 0n,
    rsi: 0n,
    rdi: 0n,
    rsp: 0n,
    rbp: 0n,
    r8: 0n,
    r9: 0n,
    r10: 0n,
    r11: 0n,
    r12: 0n,
    r13: 0n,
    r14: 0n,
    r15: 0n,
    rip: 0n,
    rflags: 2n,
  };
}

/** A default (reset-like) sregs, used when the caller does not pass KVM's current ones. */
function defaultSregs(): KvmSregs {
  const seg = (type: number, s: number): KvmSegment => ({
    base: 0n,
    limit: 0xffff,
    selector: 0,
    type,
    present: 1,
    dpl: 0,
    db: 0,
    s,
    l: 0,
    g: 0,
    avl: 0,
    unusable: 0,
  });
  return {
    cs: seg(11, 1),
    ds: seg(3, 1),
    es: seg(3, 1),
    fs: seg(3, 1),
    gs: seg(3, 1),
    ss: seg(3, 1),
    tr: seg(11, 0),
    ldt: seg(2, 0),
    gdt: { base: 0n, limit: 0xffff },
    idt: { base: 0n, limit: 0xffff },
    cr0: 0x60000010n,
    cr2: 0n,
    cr3: 0n,
    cr4: 0n,
    cr8: 0n,
    efer: 0n,
    apicBase: APIC_BASE_BSP,
    interruptBitmap: [0n, 0n, 0n, 0n],
  };
}

/**
 * Registers and special registers of the BSP for `entry`. Writes the GDT (and page tables for
 * linux64) into `mem`. `base` is the vCPU's current sregs (from KVM_GET_SREGS); fields not part of
 * the boot state (APIC base, interrupt bitmap) are kept from it.
 */
export function bspRegisters(
  mem: GuestMemory,
  entry: BootEntry,
  base?: KvmSregs,
): { regs: KvmRegs; sregs: KvmSregs } {
  const gdt = writeGdt(mem);
  const b = base ?? defaultSregs();
  const regs = zeroRegs();
  regs.rip = BigInt(entry.rip);
  regs.rsp = BigInt(Layout.bootStackTop);
  regs.rbp = BigInt(Layout.bootStackTop);
  const data = segmentFromGdt(SEL_DATA, gdt[SEL_DATA >> 3]);
  const sregs: KvmSregs = {
    ...b,
    cs: segmentFromGdt(SEL_CODE32, gdt[SEL_CODE32 >> 3]),
    ds: { ...data },
    es: { ...data },
    fs: { ...data },
    gs: { ...data },
    ss: { ...data },
    tr: segmentFromGdt(SEL_TSS, gdt[SEL_TSS >> 3]),
    ldt: {
      base: 0n,
      limit: 0,
      selector: 0,
      type: 2,
      present: 0,
      dpl: 0,
      db: 0,
      s: 0,
      l: 0,
      g: 0,
      avl: 0,
      unusable: 1,
    },
    gdt: { base: BigInt(Layout.gdtAddr), limit: gdt.length * 8 - 1 },
    idt: { base: BigInt(Layout.idtAddr), limit: 0 },
    cr2: 0n,
    cr8: 0n,
    apicBase: b.apicBase || APIC_BASE_BSP,
    interruptBitmap: [...(b.interruptBitmap ?? [0n, 0n, 0n, 0n])],
  };
  if (entry.kind === "linux64") {
    regs.rsi = BigInt(entry.rsi);
    sregs.cs = segmentFromGdt(SEL_CODE64, gdt[SEL_CODE64 >> 3]);
    sregs.cr3 = BigInt(writeIdentityPageTables(mem));
    sregs.cr4 = CR4_PAE;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
  } else {
    regs.rbx = BigInt(entry.rbx);
    sregs.cr3 = 0n;
    sregs.cr4 = 0n;
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.efer = 0n;
  }
  return { regs, sregs };
}
