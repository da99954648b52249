// KVM struct layouts (x86-64) in one place: sizes, offset tables and encode/decode helpers over DataView.
// All values were checked against <linux/kvm.h> / <asm/kvm.h> with a C program printing sizeof/offsetof;
// tests/ffi_test.ts pins them. All multi-byte fields are little-endian.

export const SIZES = {
  kvm_run: 2352, // the mmap'd region is larger (KVM_GET_VCPU_MMAP_SIZE); this is the struct itself
  kvm_regs: 144,
  kvm_sregs: 312,
  kvm_segment: 24,
  kvm_dtable: 16,
  kvm_fpu: 416,
  kvm_cpuid2: 8, // header only; entries follow
  kvm_cpuid_entry2: 40,
  kvm_msrs: 8, // header only
  kvm_msr_entry: 16,
  kvm_msr_list: 4, // header only; u32 indices follow
  kvm_lapic_state: 1024,
  kvm_irq_routing: 8, // header only
  kvm_irq_routing_entry: 48,
  kvm_irqfd: 32,
  kvm_ioeventfd: 64,
  kvm_userspace_memory_region: 32,
  kvm_pit_config: 64,
  kvm_mp_state: 4,
  kvm_irq_level: 8,
  kvm_msi: 32,
  kvm_enable_cap: 104,
  kvm_clock_data: 48,
  kvm_vcpu_events: 64,
  kvm_debugregs: 128,
  kvm_xsave: 4096,
  kvm_xcrs: 392,
  kvm_irqchip: 520,
  kvm_pit_state2: 112,
  kvm_dirty_log: 16,
  kvm_coalesced_mmio_zone: 16,
} as const;

/** struct kvm_run (the fixed part; the union starts at 32). */
export const RUN = {
  requestInterruptWindow: 0, // u8
  immediateExit: 1, // u8
  exitReason: 8, // u32
  readyForInterruptInjection: 12, // u8
  ifFlag: 13, // u8
  flags: 14, // u16
  cr8: 16, // u64
  apicBase: 24, // u64
  // union: KVM_EXIT_IO
  ioDirection: 32, // u8
  ioSize: 33, // u8
  ioPort: 34, // u16
  ioCount: 36, // u32
  ioDataOffset: 40, // u64 (offset of the data from the start of kvm_run)
  // union: KVM_EXIT_MMIO
  mmioPhysAddr: 32, // u64
  mmioData: 40, // u8[8]
  mmioLen: 48, // u32
  mmioIsWrite: 52, // u8
  // union: KVM_EXIT_SYSTEM_EVENT
  systemEventType: 32, // u32
  systemEventNdata: 36, // u32
  systemEventData: 40, // u64[16]
  // union: KVM_EXIT_INTERNAL_ERROR
  internalSuberror: 32, // u32
  internalNdata: 36, // u32
  internalData: 40, // u64[16]
  // union: KVM_EXIT_FAIL_ENTRY
  failEntryReason: 32, // u64 hardware_entry_failure_reason
  failEntryCpu: 40, // u32
  // union: KVM_EXIT_EXCEPTION
  exceptionException: 32, // u32
  exceptionErrorCode: 36, // u32
  kvmValidRegs: 288, // u64
  kvmDirtyRegs: 296, // u64
  syncRegs: 304,
} as const;

/** struct kvm_regs: 18 u64 in this order. */
export const REG_NAMES = [
  "rax",
  "rbx",
  "rcx",
  "rdx",
  "rsi",
  "rdi",
  "rsp",
  "rbp",
  "r8",
  "r9",
  "r10",
  "r11",
  "r12",
  "r13",
  "r14",
  "r15",
  "rip",
  "rflags",
] as const;
export type RegName = typeof REG_NAMES[number];
export type KvmRegs = Record<RegName, bigint>;

/** struct kvm_segment */
export const SEGMENT = {
  base: 0, // u64
  limit: 8, // u32
  selector: 12, // u16
  type: 14, // u8
  present: 15,
  dpl: 16,
  db: 17,
  s: 18,
  l: 19,
  g: 20,
  avl: 21,
  unusable: 22,
} as const;
export interface KvmSegment {
  base: bigint;
  limit: number;
  selector: number;
  type: number;
  present: number;
  dpl: number;
  db: number;
  s: number;
  l: number;
  g: number;
  avl: number;
  unusable: number;
}
export interface KvmDtable {
  base: bigint;
  limit: number;
}

/** struct kvm_sregs */
export const SREGS = {
  cs: 0,
  ds: 24,
  es: 48,
  fs: 72,
  gs: 96,
  ss: 120,
  tr: 144,
  ldt: 168,
  gdt: 192, // kvm_dtable {u64 base; u16 limit; u16 padding[3]}
  idt: 208,
  cr0: 224,
  cr2: 232,
  cr3: 240,
  cr4: 248,
  cr8: 256,
  efer: 264,
  apicBase: 272,
  interruptBitmap: 280, // u64[4]
} as const;
export const SEGMENT_NAMES = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"] as const;
export type SegmentName = typeof SEGMENT_NAMES[number];
export interface KvmSregs extends Record<SegmentName, KvmSegment> {
  gdt: KvmDtable;
  idt: KvmDtable;
  cr0: bigint;
  cr2: bigint;
  cr3: bigint;
  cr4: bigint;
  cr8: bigint;
  efer: bigint;
  apicBase: bigint;
  /** 4 words: bitmap of pending external interrupts (at most one bit set). */
  interruptBitmap: bigint[];
}

/** struct kvm_fpu */
export const FPU = {
  fpr: 0, // u8[8][16]
  fcw: 128, // u16
  fsw: 130, // u16
  ftwx: 132, // u8
  lastOpcode: 134, // u16
  lastIp: 136, // u64
  lastDp: 144, // u64
  xmm: 152, // u8[16][16]
  mxcsr: 408, // u32
} as const;
export interface KvmFpu {
  /** 8 x87 registers, 16 bytes each (80-bit value in the low 10). */
  fpr: Uint8Array;
  fcw: number;
  fsw: number;
  ftwx: number;
  lastOpcode: number;
  lastIp: bigint;
  lastDp: bigint;
  /** 16 XMM registers, 16 bytes each. */
  xmm: Uint8Array;
  mxcsr: number;
}

/** struct kvm_cpuid_entry2 */
export const CPUID_ENTRY = { function: 0, index: 4, flags: 8, eax: 12, ebx: 16, ecx: 20, edx: 24 } as const;
export interface CpuidEntry {
  function: number;
  index: number;
  flags: number;
  eax: number;
  ebx: number;
  ecx: number;
  edx: number;
}

export interface MsrEntry {
  index: number;
  data: bigint;
}

/** struct kvm_userspace_memory_region */
export const USER_MEMORY_REGION = {
  slot: 0,
  flags: 4,
  guestPhysAddr: 8,
  memorySize: 16,
  userspaceAddr: 24,
} as const;
export interface UserMemoryRegion {
  slot: number;
  flags?: number;
  guestPhysAddr: number | bigint;
  memorySize: number | bigint;
  userspaceAddr: number | bigint;
}

/** struct kvm_irq_routing_entry (union at 16) */
export const IRQ_ROUTING_ENTRY = {
  gsi: 0,
  type: 4,
  flags: 8,
  irqchipIrqchip: 16,
  irqchipPin: 20,
  msiAddressLo: 16,
  msiAddressHi: 20,
  msiData: 24,
  msiDevid: 28,
} as const;
export type IrqRoutingEntry =
  | { gsi: number; type: "irqchip"; irqchip: number; pin: number }
  | { gsi: number; type: "msi"; addressLo: number; addressHi: number; data: number; devid?: number };

/** struct kvm_irqfd */
export const IRQFD = { fd: 0, gsi: 4, flags: 8, resamplefd: 12 } as const;
/** struct kvm_ioeventfd */
export const IOEVENTFD = { datamatch: 0, addr: 8, len: 16, fd: 20, flags: 24 } as const;
/** struct kvm_irq_level */
export const IRQ_LEVEL = { irq: 0, level: 4 } as const;
/** struct kvm_msi */
export const MSI = { addressLo: 0, addressHi: 4, data: 8, flags: 12, devid: 16 } as const;
/** struct kvm_enable_cap */
export const ENABLE_CAP = { cap: 0, flags: 4, args: 8 } as const;
/** struct kvm_clock_data */
export const CLOCK_DATA = { clock: 0, flags: 8, realtime: 16, hostTsc: 24 } as const;
export interface KvmClockData {
  clock: bigint;
  flags: number;
  realtime: bigint;
  hostTsc: bigint;
}

// ---------------------------------------------------------------------------------------------------
// encode / decode

const u64 = (v: number | bigint): bigint => BigInt.asUintN(64, BigInt(v));

export function newStruct(size: number): { bytes: Uint8Array; view: DataView } {
  const bytes = new Uint8Array(size);
  return { bytes, view: new DataView(bytes.buffer) };
}

export function encodeRegs(view: DataView, regs: KvmRegs, off = 0): void {
  for (let i = 0; i < REG_NAMES.length; i++) view.setBigUint64(off + i * 8, u64(regs[REG_NAMES[i]]), true);
}
export function decodeRegs(view: DataView, off = 0): KvmRegs {
  const r = {} as KvmRegs;
  for (let i = 0; i < REG_NAMES.length; i++) r[REG_NAMES[i]] = view.getBigUint64(off + i * 8, true);
  return r;
}

export function encodeSegment(view: DataView, off: number, s: KvmSegment): void {
  view.setBigUint64(off + SEGMENT.base, u64(s.base), true);
  view.setUint32(off + SEGMENT.limit, s.limit >>> 0, true);
  view.setUint16(off + SEGMENT.selector, s.selector, true);
  view.setUint8(off + SEGMENT.type, s.type);
  view.setUint8(off + SEGMENT.present, s.present);
  view.setUint8(off + SEGMENT.dpl, s.dpl);
  view.setUint8(off + SEGMENT.db, s.db);
  view.setUint8(off + SEGMENT.s, s.s);
  view.setUint8(off + SEGMENT.l, s.l);
  view.setUint8(off + SEGMENT.g, s.g);
  view.setUint8(off + SEGMENT.avl, s.avl);
  view.setUint8(off + SEGMENT.unusable, s.unusable ?? 0);
  view.setUint8(off + 23, 0);
}
export function decodeSegment(view: DataView, off: number): KvmSegment {
  return {
    base: view.getBigUint64(off + SEGMENT.base, true),
    limit: view.getUint32(off + SEGMENT.limit, true),
    selector: view.getUint16(off + SEGMENT.selector, true),
    type: view.getUint8(off + SEGMENT.type),
    present: view.getUint8(off + SEGMENT.present),
    dpl: view.getUint8(off + SEGMENT.dpl),
    db: view.getUint8(off + SEGMENT.db),
    s: view.getUint8(off + SEGMENT.s),
    l: view.getUint8(off + SEGMENT.l),
    g: view.getUint8(off + SEGMENT.g),
    avl: view.getUint8(off + SEGMENT.avl),
    unusable: view.getUint8(off + SEGMENT.unusable),
  };
}

function encodeDtable(view: DataView, off: number, d: KvmDtable): void {
  view.setBigUint64(off, u64(d.base), true);
  view.setUint16(off + 8, d.limit, true);
  view.setUint16(off + 10, 0, true);
  view.setUint32(off + 12, 0, true);
}
function decodeDtable(view: DataView, off: number): KvmDtable {
  return { base: view.getBigUint64(off, true), limit: view.getUint16(off + 8, true) };
}

export function encodeSregs(view: DataView, s: KvmSregs, off = 0): void {
  for (const name of SEGMENT_NAMES) encodeSegment(view, off + SREGS[name], s[name]);
  encodeDtable(view, off + SREGS.gdt, s.gdt);
  encodeDtable(view, off + SREGS.idt, s.idt);
  view.setBigUint64(off + SREGS.cr0, u64(s.cr0), true);
  view.setBigUint64(off + SREGS.cr2, u64(s.cr2), true);
  view.setBigUint64(off + SREGS.cr3, u64(s.cr3), true);
  view.setBigUint64(off + SREGS.cr4, u64(s.cr4), true);
  view.setBigUint64(off + SREGS.cr8, u64(s.cr8), true);
  view.setBigUint64(off + SREGS.efer, u64(s.efer), true);
  view.setBigUint64(off + SREGS.apicBase, u64(s.apicBase), true);
  for (let i = 0; i < 4; i++) {
    view.setBigUint64(off + SREGS.interruptBitmap + i * 8, u64(s.interruptBitmap?.[i] ?? 0n), true);
  }
}
export function decodeSregs(view: DataView, off = 0): KvmSregs {
  const bitmap: bigint[] = [];
  for (let i = 0; i < 4; i++) bitmap.push(view.getBigUint64(off + SREGS.interruptBitmap + i * 8, true));
  return {
    cs: decodeSegment(view, off + SREGS.cs),
    ds: decodeSegment(view, off + SREGS.ds),
    es: decodeSegment(view, off + SREGS.es),
    fs: decodeSegment(view, off + SREGS.fs),
    gs: decodeSegment(view, off + SREGS.gs),
    ss: decodeSegment(view, off + SREGS.ss),
    tr: decodeSegment(view, off + SREGS.tr),
    ldt: decodeSegment(view, off + SREGS.ldt),
    gdt: decodeDtable(view, off + SREGS.gdt),
    idt: decodeDtable(view, off + SREGS.idt),
    cr0: view.getBigUint64(off + SREGS.cr0, true),
    cr2: view.getBigUint64(off + SREGS.cr2, true),
    cr3: view.getBigUint64(off + SREGS.cr3, true),
    cr4: view.getBigUint64(off + SREGS.cr4, true),
    cr8: view.getBigUint64(off + SREGS.cr8, true),
    efer: view.getBigUint64(off + SREGS.efer, true),
    apicBase: view.getBigUint64(off + SREGS.apicBase, true),
    interruptBitmap: bitmap,
  };
}

/** Encodes a kvm_fpu. Fields left undefined in `f` keep the bytes already in the buffer. */
export function encodeFpu(view: DataView, f: Partial<KvmFpu>, off = 0): void {
  const bytes = new Uint8Array(view.buffer, view.byteOffset + off, SIZES.kvm_fpu);
  if (f.fpr) bytes.set(f.fpr.subarray(0, 128), FPU.fpr);
  if (f.fcw !== undefined) view.setUint16(off + FPU.fcw, f.fcw, true);
  if (f.fsw !== undefined) view.setUint16(off + FPU.fsw, f.fsw, true);
  if (f.ftwx !== undefined) view.setUint8(off + FPU.ftwx, f.ftwx);
  if (f.lastOpcode !== undefined) view.setUint16(off + FPU.lastOpcode, f.lastOpcode, true);
  if (f.lastIp !== undefined) view.setBigUint64(off + FPU.lastIp, u64(f.lastIp), true);
  if (f.lastDp !== undefined) view.setBigUint64(off + FPU.lastDp, u64(f.lastDp), true);
  if (f.xmm) bytes.set(f.xmm.subarray(0, 256), FPU.xmm);
  if (f.mxcsr !== undefined) view.setUint32(off + FPU.mxcsr, f.mxcsr >>> 0, true);
}
export function decodeFpu(view: DataView, off = 0): KvmFpu {
  const bytes = new Uint8Array(view.buffer, view.byteOffset + off, SIZES.kvm_fpu);
  return {
    fpr: bytes.slice(FPU.fpr, FPU.fpr + 128),
    fcw: view.getUint16(off + FPU.fcw, true),
    fsw: view.getUint16(off + FPU.fsw, true),
    ftwx: view.getUint8(off + FPU.ftwx),
    lastOpcode: view.getUint16(off + FPU.lastOpcode, true),
    lastIp: view.getBigUint64(off + FPU.lastIp, true),
    lastDp: view.getBigUint64(off + FPU.lastDp, true),
    xmm: bytes.slice(FPU.xmm, FPU.xmm + 256),
    mxcsr: view.getUint32(off + FPU.mxcsr, true),
  };
}

/** A kvm_cpuid2 with room for `capacity` entries (nent = capacity), filled with `entries`. */
export function encodeCpuid2(entries: CpuidEntry[], capacity = entries.length): Uint8Array {
  const { bytes, view } = newStruct(SIZES.kvm_cpuid2 + capacity * SIZES.kvm_cpuid_entry2);
  view.setUint32(0, capacity, true);
  entries.forEach((e, i) => {
    const o = SIZES.kvm_cpuid2 + i * SIZES.kvm_cpuid_entry2;
    view.setUint32(o + CPUID_ENTRY.function, e.function >>> 0, true);
    view.setUint32(o + CPUID_ENTRY.index, e.index >>> 0, true);
    view.setUint32(o + CPUID_ENTRY.flags, e.flags >>> 0, true);
    view.setUint32(o + CPUID_ENTRY.eax, e.eax >>> 0, true);
    view.setUint32(o + CPUID_ENTRY.ebx, e.ebx >>> 0, true);
    view.setUint32(o + CPUID_ENTRY.ecx, e.ecx >>> 0, true);
    view.setUint32(o + CPUID_ENTRY.edx, e.edx >>> 0, true);
  });
  return bytes;
}
export function decodeCpuid2(bytes: Uint8Array): CpuidEntry[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = view.getUint32(0, true);
  const out: CpuidEntry[] = [];
  for (let i = 0; i < n; i++) {
    const o = SIZES.kvm_cpuid2 + i * SIZES.kvm_cpuid_entry2;
    out.push({
      function: view.getUint32(o + CPUID_ENTRY.function, true),
      index: view.getUint32(o + CPUID_ENTRY.index, true),
      flags: view.getUint32(o + CPUID_ENTRY.flags, true),
      eax: view.getUint32(o + CPUID_ENTRY.eax, true),
      ebx: view.getUint32(o + CPUID_ENTRY.ebx, true),
      ecx: view.getUint32(o + CPUID_ENTRY.ecx, true),
      edx: view.getUint32(o + CPUID_ENTRY.edx, true),
    });
  }
  return out;
}

/** A kvm_msrs with the given entries (data of missing entries is 0). */
export function encodeMsrs(entries: { index: number; data?: bigint }[]): Uint8Array {
  const { bytes, view } = newStruct(SIZES.kvm_msrs + entries.length * SIZES.kvm_msr_entry);
  view.setUint32(0, entries.length, true);
  entries.forEach((e, i) => {
    const o = SIZES.kvm_msrs + i * SIZES.kvm_msr_entry;
    view.setUint32(o, e.index >>> 0, true);
    view.setBigUint64(o + 8, u64(e.data ?? 0n), true);
  });
  return bytes;
}
/** Decodes the first `count` entries of a kvm_msrs (default: nmsrs). */
export function decodeMsrs(bytes: Uint8Array, count?: number): MsrEntry[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = count ?? view.getUint32(0, true);
  const out: MsrEntry[] = [];
  for (let i = 0; i < n; i++) {
    const o = SIZES.kvm_msrs + i * SIZES.kvm_msr_entry;
    out.push({ index: view.getUint32(o, true), data: view.getBigUint64(o + 8, true) });
  }
  return out;
}

export function encodeIrqRouting(entries: IrqRoutingEntry[]): Uint8Array {
  const { bytes, view } = newStruct(SIZES.kvm_irq_routing + entries.length * SIZES.kvm_irq_routing_entry);
  view.setUint32(0, entries.length, true);
  view.setUint32(4, 0, true);
  entries.forEach((e, i) => {
    const o = SIZES.kvm_irq_routing + i * SIZES.kvm_irq_routing_entry;
    view.setUint32(o + IRQ_ROUTING_ENTRY.gsi, e.gsi >>> 0, true);
    if (e.type === "irqchip") {
      view.setUint32(o + IRQ_ROUTING_ENTRY.type, 1, true); // KVM_IRQ_ROUTING_IRQCHIP
      view.setUint32(o + IRQ_ROUTING_ENTRY.irqchipIrqchip, e.irqchip >>> 0, true);
      view.setUint32(o + IRQ_ROUTING_ENTRY.irqchipPin, e.pin >>> 0, true);
    } else {
      view.setUint32(o + IRQ_ROUTING_ENTRY.type, 2, true); // KVM_IRQ_ROUTING_MSI
      view.setUint32(o + IRQ_ROUTING_ENTRY.flags, e.devid !== undefined ? 1 : 0, true); // KVM_MSI_VALID_DEVID
      view.setUint32(o + IRQ_ROUTING_ENTRY.msiAddressLo, e.addressLo >>> 0, true);
      view.setUint32(o + IRQ_ROUTING_ENTRY.msiAddressHi, e.addressHi >>> 0, true);
      view.setUint32(o + IRQ_ROUTING_ENTRY.msiData, e.data >>> 0, true);
      view.setUint32(o + IRQ_ROUTING_ENTRY.msiDevid, (e.devid ?? 0) >>> 0, true);
    }
  });
  return bytes;
}

export function encodeUserMemoryRegion(view: DataView, r: UserMemoryRegion): void {
  view.setUint32(USER_MEMORY_REGION.slot, r.slot >>> 0, true);
  view.setUint32(USER_MEMORY_REGION.flags, (r.flags ?? 0) >>> 0, true);
  view.setBigUint64(USER_MEMORY_REGION.guestPhysAddr, u64(r.guestPhysAddr), true);
  view.setBigUint64(USER_MEMORY_REGION.memorySize, u64(r.memorySize), true);
  view.setBigUint64(USER_MEMORY_REGION.userspaceAddr, u64(r.userspaceAddr), true);
}

export function encodeIrqfd(
  view: DataView,
  a: { fd: number; gsi: number; flags: number; resamplefd?: number },
): void {
  new Uint8Array(view.buffer, view.byteOffset, SIZES.kvm_irqfd).fill(0);
  view.setUint32(IRQFD.fd, a.fd >>> 0, true);
  view.setUint32(IRQFD.gsi, a.gsi >>> 0, true);
  view.setUint32(IRQFD.flags, a.flags >>> 0, true);
  view.setUint32(IRQFD.resamplefd, (a.resamplefd ?? 0) >>> 0, true);
}

export function encodeIoeventfd(
  view: DataView,
  a: { datamatch: number | bigint; addr: number | bigint; len: number; fd: number; flags: number },
): void {
  new Uint8Array(view.buffer, view.byteOffset, SIZES.kvm_ioeventfd).fill(0);
  view.setBigUint64(IOEVENTFD.datamatch, u64(a.datamatch), true);
  view.setBigUint64(IOEVENTFD.addr, u64(a.addr), true);
  view.setUint32(IOEVENTFD.len, a.len >>> 0, true);
  view.setInt32(IOEVENTFD.fd, a.fd, true);
  view.setUint32(IOEVENTFD.flags, a.flags >>> 0, true);
}

export function encodeIrqLevel(view: DataView, irq: number, level: number): void {
  view.setUint32(IRQ_LEVEL.irq, irq >>> 0, true);
  view.setUint32(IRQ_LEVEL.level, level >>> 0, true);
}

export function encodeMsi(
  view: DataView,
  m: { addressLo: number; addressHi: number; data: number; devid?: number },
): void {
  new Uint8Array(view.buffer, view.byteOffset, SIZES.kvm_msi).fill(0);
  view.setUint32(MSI.addressLo, m.addressLo >>> 0, true);
  view.setUint32(MSI.addressHi, m.addressHi >>> 0, true);
  view.setUint32(MSI.data, m.data >>> 0, true);
  view.setUint32(MSI.flags, m.devid !== undefined ? 1 : 0, true);
  view.setUint32(MSI.devid, (m.devid ?? 0) >>> 0, true);
}

export function encodeEnableCap(
  view: DataView,
  cap: number,
  args: (number | bigint)[] = [],
  flags = 0,
): void {
  if (args.length > 4) throw new RangeError("kvm_enable_cap takes at most 4 args");
  new Uint8Array(view.buffer, view.byteOffset, SIZES.kvm_enable_cap).fill(0);
  view.setUint32(ENABLE_CAP.cap, cap >>> 0, true);
  view.setUint32(ENABLE_CAP.flags, flags >>> 0, true);
  args.forEach((a, i) => view.setBigUint64(ENABLE_CAP.args + i * 8, u64(a), true));
}

export function encodeClockData(view: DataView, c: Partial<KvmClockData> & { clock: bigint }): void {
  new Uint8Array(view.buffer, view.byteOffset, SIZES.kvm_clock_data).fill(0);
  view.setBigUint64(CLOCK_DATA.clock, u64(c.clock), true);
  view.setUint32(CLOCK_DATA.flags, (c.flags ?? 0) >>> 0, true);
  view.setBigUint64(CLOCK_DATA.realtime, u64(c.realtime ?? 0n), true);
  view.setBigUint64(CLOCK_DATA.hostTsc, u64(c.hostTsc ?? 0n), true);
}
export function decodeClockData(view: DataView): KvmClockData {
  return {
    clock: view.getBigUint64(CLOCK_DATA.clock, true),
    flags: view.getUint32(CLOCK_DATA.flags, true),
    realtime: view.getBigUint64(CLOCK_DATA.realtime, true),
    hostTsc: view.getBigUint64(CLOCK_DATA.hostTsc, true),
  };
}
