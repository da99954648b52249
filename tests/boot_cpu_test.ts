import assert from "node:assert/strict";
import { GuestMemory } from "../vmm/memory.ts";
import { Layout, ramRegions } from "../vmm/layout.ts";
import {
  APIC_BASE_BSP,
  bspRegisters,
  CR0_PE,
  CR0_PG,
  CR4_PAE,
  EFER_LMA,
  EFER_LME,
  gdtEntry,
  segmentFromGdt,
} from "../vmm/boot_cpu.ts";
import { REG_NAMES, SEGMENT_NAMES } from "../ffi/structs.ts";

const MiB = 1024 * 1024;

/**
 * A 4-level x86-64 page walk (4 KiB, 2 MiB and 1 GiB pages) reading tables from guest memory.
 * Returns the physical address or null when a level is not present.
 */
function walk(mem: GuestMemory, cr3: bigint, va: number): number | null {
  const v = BigInt(va);
  const addrMask = 0x000f_ffff_ffff_f000n;
  let table = cr3 & addrMask;
  const shifts = [39n, 30n, 21n, 12n];
  for (let level = 0; level < 4; level++) {
    const idx = (v >> shifts[level]) & 0x1ffn;
    const e = mem.readU64Big(Number(table + idx * 8n));
    if (!(e & 1n)) return null;
    const ps = (e & 0x80n) !== 0n;
    if (level > 0 && level < 3 && ps) {
      const pageMask = (1n << shifts[level]) - 1n;
      return Number((e & addrMask & ~pageMask) | (v & pageMask));
    }
    if (level === 3) return Number((e & addrMask) | (v & 0xfffn));
    table = e & addrMask;
  }
  return null;
}

Deno.test("boot_cpu: GDT descriptor encoding round-trips", () => {
  assert.equal(gdtEntry(0x9b, 0xa, 0, 0xfffff), 0x00af9b000000ffffn);
  assert.equal(gdtEntry(0x93, 0xc, 0, 0xfffff), 0x00cf93000000ffffn);
  assert.equal(gdtEntry(0x9b, 0xc, 0, 0xfffff), 0x00cf9b000000ffffn);
  const s = segmentFromGdt(0x10, 0x00af9b000000ffffn);
  assert.deepEqual(s, {
    base: 0n,
    limit: 0xffffffff,
    selector: 0x10,
    type: 0xb,
    present: 1,
    dpl: 0,
    db: 0,
    s: 1,
    l: 1,
    g: 1,
    avl: 0,
    unusable: 0,
  });
  const t = segmentFromGdt(0x20, gdtEntry(0x8b, 0, 0x12345678, 0x67));
  assert.equal(t.base, 0x12345678n);
  assert.equal(t.limit, 0x67);
  assert.equal(t.s, 0);
});

Deno.test("boot_cpu: linux64 entry: long mode, boot selectors, identity map covering boot data", () => {
  const size = 512 * MiB;
  const mem = GuestMemory.fromBuffers(ramRegions(size));
  const { regs, sregs } = bspRegisters(mem, { kind: "linux64", rip: 0x1000200, rsi: Layout.zeroPageAddr });
  // Shapes match ffi/structs.ts.
  assert.deepEqual(Object.keys(regs).sort(), [...REG_NAMES].sort());
  for (const n of SEGMENT_NAMES) assert.ok(sregs[n], n);
  assert.equal(regs.rip, 0x1000200n);
  assert.equal(regs.rsi, BigInt(Layout.zeroPageAddr));
  assert.equal(regs.rflags, 2n);
  assert.equal(regs.rsp, BigInt(Layout.bootStackTop));

  assert.equal(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
  assert.equal(sregs.cr4 & CR4_PAE, CR4_PAE);
  assert.equal(sregs.efer, EFER_LME | EFER_LMA);
  assert.equal(sregs.apicBase, APIC_BASE_BSP);
  assert.equal(sregs.cs.selector, 0x10);
  assert.equal(sregs.cs.l, 1);
  assert.equal(sregs.cs.db, 0);
  assert.equal(sregs.cs.type & 0x8, 0x8, "code");
  for (const n of ["ds", "es", "ss", "fs", "gs"] as const) {
    assert.equal(sregs[n].selector, 0x18);
    assert.equal(sregs[n].type, 3);
    assert.equal(sregs[n].present, 1);
  }
  assert.equal(sregs.tr.type, 11);
  assert.equal(sregs.tr.present, 1);
  assert.equal(sregs.gdt.base, BigInt(Layout.gdtAddr));
  // The GDT in memory holds what the segment registers claim.
  for (const n of ["cs", "ds", "tr"] as const) {
    const sel = sregs[n].selector;
    assert.ok(sel + 7 <= sregs.gdt.limit);
    assert.deepEqual(segmentFromGdt(sel, mem.readU64Big(Layout.gdtAddr + sel)), sregs[n]);
  }

  // Identity map.
  const cr3 = sregs.cr3;
  const addrs = [
    0,
    Layout.zeroPageAddr,
    Layout.cmdlineAddr + 5,
    Layout.pml4Addr,
    0x1000000,
    0x1000200,
    0x4000000 + 0x1234,
    size - 4096, // top of RAM (initramfs)
    0xbfff_f000,
    0xfee0_0000,
    0xffff_ffff,
  ];
  for (const a of addrs) assert.equal(walk(mem, cr3, a), a, `0x${a.toString(16)}`);
  assert.equal(walk(mem, cr3, 0x1_0000_0000), null, "4 GiB and above not mapped");
});

Deno.test("boot_cpu: PVH entry: 32-bit protected mode, paging off, EBX = start_info; keeps KVM's APIC base", () => {
  const mem = GuestMemory.fromBuffers(ramRegions(64 * MiB));
  const first = bspRegisters(mem, { kind: "linux64", rip: 0x1000200, rsi: 0x7000 }).sregs;
  const base = { ...first, apicBase: 0xfee00d00n, interruptBitmap: [0n, 0n, 0n, 0n] };
  const { regs, sregs } = bspRegisters(
    mem,
    { kind: "pvh", rip: 0x1000850, rbx: Layout.pvhStartInfoAddr },
    base,
  );
  assert.equal(regs.rip, 0x1000850n);
  assert.equal(regs.rbx, BigInt(Layout.pvhStartInfoAddr));
  assert.equal(regs.rflags, 2n);
  assert.equal(sregs.cr0 & CR0_PG, 0n);
  assert.equal(sregs.cr0 & CR0_PE, CR0_PE);
  assert.equal(sregs.cr4, 0n);
  assert.equal(sregs.efer, 0n);
  assert.equal(sregs.cs.selector, 0x08);
  assert.equal(sregs.cs.db, 1);
  assert.equal(sregs.cs.l, 0);
  assert.equal(sregs.cs.limit, 0xffffffff);
  assert.equal(sregs.cs.base, 0n);
  assert.equal(sregs.ds.db, 1);
  assert.equal(sregs.ds.limit, 0xffffffff);
  assert.equal(sregs.tr.limit, 0x67);
  assert.equal(sregs.apicBase, 0xfee00d00n);
});
