// ffi/: struct layouts and ioctl numbers (pinned to values printed by a C program from the kernel headers),
// shim helpers, and native tests against the real /dev/kvm with hand-assembled real-mode guests.

import assert from "node:assert/strict";
import * as C from "../ffi/kvm_constants.ts";
import {
  decodeRegs,
  decodeSregs,
  encodeIrqRouting,
  encodeRegs,
  encodeSregs,
  type KvmRegs,
  newStruct,
  REG_NAMES,
  RUN,
  SIZES,
} from "../ffi/structs.ts";
import { check, cstr, EAGAIN, EINTR, errnoName, OsError, shim } from "../ffi/shim.ts";
import {
  EventFd,
  kick,
  Kvm,
  mapAnonymous,
  mapFd,
  mapMemfd,
  mappingBytes,
  nowNs,
  unmap,
  type VcpuDescriptor,
} from "../ffi/kvm.ts";
import { asm16, assemble, createRealModeVm, kvmAvailable } from "./helpers/realmode.ts";

const HAVE_KVM = kvmAvailable();
const kvmTest = (name: string, fn: () => void | Promise<void>) => Deno.test({ name, ignore: !HAVE_KVM, fn });

// ---------------------------------------------------------------------------------------------------
// layouts (values from sizeof/offsetof in C against /usr/include/linux/kvm.h)

Deno.test("struct sizes match the kernel headers", () => {
  const expected: Record<string, number> = {
    kvm_run: 2352,
    kvm_regs: 144,
    kvm_sregs: 312,
    kvm_segment: 24,
    kvm_dtable: 16,
    kvm_fpu: 416,
    kvm_cpuid2: 8,
    kvm_cpuid_entry2: 40,
    kvm_msrs: 8,
    kvm_msr_entry: 16,
    kvm_msr_list: 4,
    kvm_lapic_state: 1024,
    kvm_irq_routing: 8,
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
  };
  assert.deepEqual({ ...SIZES }, expected);
});

Deno.test("kvm_run offsets match the kernel headers", () => {
  assert.equal(RUN.immediateExit, 1);
  assert.equal(RUN.exitReason, 8);
  assert.equal(RUN.ioDirection, 32);
  assert.equal(RUN.ioSize, 33);
  assert.equal(RUN.ioPort, 34);
  assert.equal(RUN.ioCount, 36);
  assert.equal(RUN.ioDataOffset, 40);
  assert.equal(RUN.mmioPhysAddr, 32);
  assert.equal(RUN.mmioData, 40);
  assert.equal(RUN.mmioLen, 48);
  assert.equal(RUN.mmioIsWrite, 52);
  assert.equal(RUN.systemEventType, 32);
  assert.equal(RUN.systemEventNdata, 36);
  assert.equal(RUN.systemEventData, 40);
  assert.equal(RUN.internalSuberror, 32);
  assert.equal(RUN.failEntryReason, 32);
  assert.equal(RUN.failEntryCpu, 40);
  assert.equal(RUN.kvmValidRegs, 288);
  assert.equal(RUN.syncRegs, 304);
});

Deno.test("ioctl numbers match the kernel headers", () => {
  const expected: Record<string, number> = {
    KVM_GET_API_VERSION: 0xae00,
    KVM_CREATE_VM: 0xae01,
    KVM_CHECK_EXTENSION: 0xae03,
    KVM_GET_VCPU_MMAP_SIZE: 0xae04,
    KVM_GET_SUPPORTED_CPUID: 0xc008ae05,
    KVM_GET_MSR_INDEX_LIST: 0xc004ae02,
    KVM_SET_USER_MEMORY_REGION: 0x4020ae46,
    KVM_CREATE_VCPU: 0xae41,
    KVM_SET_TSS_ADDR: 0xae47,
    KVM_SET_IDENTITY_MAP_ADDR: 0x4008ae48,
    KVM_CREATE_IRQCHIP: 0xae60,
    KVM_IRQ_LINE: 0x4008ae61,
    KVM_IRQ_LINE_STATUS: 0xc008ae67,
    KVM_SET_GSI_ROUTING: 0x4008ae6a,
    KVM_IRQFD: 0x4020ae76,
    KVM_CREATE_PIT2: 0x4040ae77,
    KVM_IOEVENTFD: 0x4040ae79,
    KVM_REGISTER_COALESCED_MMIO: 0x4010ae67,
    KVM_UNREGISTER_COALESCED_MMIO: 0x4010ae68,
    KVM_SIGNAL_MSI: 0x4020aea5,
    KVM_ENABLE_CAP: 0x4068aea3,
    KVM_SET_CLOCK: 0x4030ae7b,
    KVM_GET_CLOCK: 0x8030ae7c,
    KVM_GET_IRQCHIP: 0xc208ae62,
    KVM_SET_IRQCHIP: 0x8208ae63,
    KVM_GET_DIRTY_LOG: 0x4010ae42,
    KVM_GET_PIT2: 0x8070ae9f,
    KVM_SET_PIT2: 0x4070aea0,
    KVM_RUN: 0xae80,
    KVM_GET_REGS: 0x8090ae81,
    KVM_SET_REGS: 0x4090ae82,
    KVM_GET_SREGS: 0x8138ae83,
    KVM_SET_SREGS: 0x4138ae84,
    KVM_GET_MSRS: 0xc008ae88,
    KVM_SET_MSRS: 0x4008ae89,
    KVM_GET_FPU: 0x81a0ae8c,
    KVM_SET_FPU: 0x41a0ae8d,
    KVM_GET_LAPIC: 0x8400ae8e,
    KVM_SET_LAPIC: 0x4400ae8f,
    KVM_SET_CPUID2: 0x4008ae90,
    KVM_GET_CPUID2: 0xc008ae91,
    KVM_GET_MP_STATE: 0x8004ae98,
    KVM_SET_MP_STATE: 0x4004ae99,
    KVM_NMI: 0xae9a,
    KVM_INTERRUPT: 0x4004ae86,
    KVM_GET_VCPU_EVENTS: 0x8040ae9f,
    KVM_SET_VCPU_EVENTS: 0x4040aea0,
    KVM_SET_TSC_KHZ: 0xaea2,
    KVM_GET_TSC_KHZ: 0xaea3,
    KVM_GET_XSAVE: 0x9000aea4,
    KVM_SET_XSAVE: 0x5000aea5,
    KVM_GET_XCRS: 0x8188aea6,
    KVM_SET_XCRS: 0x4188aea7,
    KVM_GET_DEBUGREGS: 0x8080aea1,
    KVM_SET_DEBUGREGS: 0x4080aea2,
  };
  const consts = C as unknown as Record<string, number>;
  for (const [name, value] of Object.entries(expected)) {
    assert.equal(
      consts[name],
      value,
      `${name} = 0x${consts[name]?.toString(16)}, want 0x${value.toString(16)}`,
    );
  }
});

Deno.test("regs and sregs encode/decode round-trip", () => {
  const regs = {} as KvmRegs;
  REG_NAMES.forEach((n, i) => regs[n] = BigInt(i + 1) * 0x0101010101010101n);
  regs.rflags = 0xffff_ffff_ffff_fffen;
  const r = newStruct(SIZES.kvm_regs);
  encodeRegs(r.view, regs);
  assert.equal(r.view.getBigUint64(16 * 8, true), regs.rip); // rip is the 17th word
  assert.deepEqual(decodeRegs(r.view), regs);

  const s = newStruct(SIZES.kvm_sregs);
  for (let i = 0; i < s.bytes.length; i++) s.bytes[i] = (i * 7 + 3) & 0xff;
  const sregs = decodeSregs(s.view);
  const s2 = newStruct(SIZES.kvm_sregs);
  encodeSregs(s2.view, sregs);
  const again = decodeSregs(s2.view);
  assert.deepEqual(again, sregs);
  assert.equal(s2.view.getBigUint64(224, true), sregs.cr0);
  assert.equal(s2.view.getUint16(12, true), sregs.cs.selector);
});

Deno.test("irq routing encoding", () => {
  const b = encodeIrqRouting([
    { gsi: 4, type: "irqchip", irqchip: C.KVM_IRQCHIP_IOAPIC, pin: 4 },
    { gsi: 24, type: "msi", addressLo: 0xfee00000, addressHi: 0, data: 0x4031, devid: 8 },
  ]);
  const v = new DataView(b.buffer);
  assert.equal(b.length, 8 + 2 * 48);
  assert.equal(v.getUint32(0, true), 2);
  assert.deepEqual([
    v.getUint32(8, true),
    v.getUint32(12, true),
    v.getUint32(24, true),
    v.getUint32(28, true),
  ], [
    4,
    C.KVM_IRQ_ROUTING_IRQCHIP,
    2,
    4,
  ]);
  const e = 8 + 48;
  assert.equal(v.getUint32(e + 4, true), C.KVM_IRQ_ROUTING_MSI);
  assert.equal(v.getUint32(e + 8, true), C.KVM_MSI_VALID_DEVID);
  assert.equal(v.getUint32(e + 16, true), 0xfee00000);
  assert.equal(v.getUint32(e + 24, true), 0x4031);
  assert.equal(v.getUint32(e + 28, true), 8);
});

// ---------------------------------------------------------------------------------------------------
// shim helpers

Deno.test("shim: check() raises OsError with the errno name", () => {
  assert.equal(check(5n, "ok"), 5);
  const r = shim().kvs_close(-1);
  assert.equal(r, -9n);
  assert.throws(() => check(r, "close -1"), (e: unknown) => {
    assert.ok(e instanceof OsError);
    assert.equal(e.errno, 9);
    assert.equal(e.code, "EBADF");
    assert.match(e.message, /close -1: EBADF/);
    return true;
  });
  assert.equal(errnoName(EINTR), "EINTR");
  assert.equal(errnoName(EAGAIN), "EAGAIN");
  assert.deepEqual([...cstr("ab")], [0x61, 0x62, 0]);
  assert.ok(shim().kvs_now_ns() > 0n);
  assert.ok(shim().kvs_kick_signal() > 32);
});

Deno.test("eventfd write/read", () => {
  const e = EventFd.create(C.EFD_NONBLOCK);
  try {
    assert.equal(e.read(), 0n); // EAGAIN on an empty non-blocking eventfd
    e.write();
    e.write(2n);
    assert.equal(e.read(), 3n);
    assert.equal(e.read(), 0n);
    assert.equal(shim().kvs_poll1(e.fd, C.POLLIN, 0), 0n);
    e.write(5n);
    assert.equal(Number(shim().kvs_poll1(e.fd, C.POLLIN, 0)) & C.POLLIN, C.POLLIN);
    // The same fd seen from "another thread" (same process) reads the same counter.
    assert.equal(EventFd.fromFd(e.fd).read(), 5n);
  } finally {
    e.close();
  }
  const sem = EventFd.create(C.EFD_NONBLOCK | C.EFD_SEMAPHORE);
  try {
    sem.write(2n);
    assert.equal(sem.read(), 1n);
    assert.equal(sem.read(), 1n);
    assert.equal(sem.read(), 0n);
  } finally {
    sem.close();
  }
});

Deno.test("memfd mapping is visible through two mappings", () => {
  const size = 1 << 20;
  const a = mapMemfd(size, "dvmm-test");
  assert.ok(a.fd !== undefined && a.fd >= 0);
  const b = mapFd(a.fd!, size);
  try {
    assert.notEqual(a.hostAddr, b.hostAddr);
    const va = mappingBytes(a);
    const vb = mappingBytes(b);
    va[0] = 0x11;
    va[size - 1] = 0x22;
    vb[4096] = 0x33;
    assert.equal(vb[0], 0x11);
    assert.equal(vb[size - 1], 0x22);
    assert.equal(va[4096], 0x33);
  } finally {
    unmap(b, false);
    unmap(a);
  }
  const anon = mapAnonymous(2 << 20);
  const v = mappingBytes(anon);
  assert.equal(v.length, 2 << 20);
  assert.equal(v[12345], 0);
  v[12345] = 7;
  assert.equal(v[12345], 7);
  unmap(anon);
});

// ---------------------------------------------------------------------------------------------------
// native KVM

kvmTest("kvm: api version, vcpu mmap size, supported CPUID, MSR list", () => {
  const kvm = Kvm.open();
  try {
    assert.equal(kvm.apiVersion(), C.KVM_API_VERSION);
    const size = kvm.vcpuMmapSize();
    assert.ok(size >= SIZES.kvm_run && size % 4096 === 0, `vcpu mmap size ${size}`);
    assert.ok(kvm.checkExtension(C.KVM_CAP_USER_MEMORY) > 0);
    const cpuid = kvm.supportedCpuid();
    assert.ok(cpuid.length > 4, `${cpuid.length} CPUID entries`);
    const leaf0 = cpuid.find((e) => e.function === 0);
    assert.ok(leaf0 && leaf0.eax >= 1, "CPUID leaf 0 present");
    assert.ok(cpuid.some((e) => e.function === 0x80000000), "extended leaves present");
    const msrs = kvm.msrIndexList();
    assert.ok(
      msrs.includes(0x174) && msrs.includes(0xc0000081),
      "SYSENTER_CS and STAR in the MSR index list",
    );
  } finally {
    kvm.close();
  }
});

const OUT_A = assemble(asm16.movDxImm(0x3f8), asm16.movAlImm(0x41), asm16.outDxAl(), asm16.hlt());

kvmTest("real mode: sregs set-up, PIO OUT exit, HLT exit", () => {
  const g = createRealModeVm(OUT_A);
  try {
    const sregs = g.vcpu.getSregs();
    assert.equal(sregs.cs.base, 0n);
    assert.equal(sregs.cs.selector, 0);
    assert.equal(sregs.cr0 & 1n, 0n, "real mode (CR0.PE clear)");
    assert.equal(g.vcpu.getRegs().rip, BigInt(g.codeAddr));

    assert.equal(g.vcpu.run(), 0);
    assert.equal(g.run.exitReason, C.KVM_EXIT_IO, C.exitReasonName(g.run.exitReason));
    assert.equal(g.run.ioDirection, C.KVM_EXIT_IO_OUT);
    assert.equal(g.run.ioPort, 0x3f8);
    assert.equal(g.run.ioSize, 1);
    assert.equal(g.run.ioCount, 1);
    assert.ok(g.run.ioDataOffset >= SIZES.kvm_run && g.run.ioDataOffset < g.vcpu.runSize);
    assert.equal(g.run.data[g.run.ioDataOffset], 0x41);

    assert.equal(g.vcpu.run(), 0);
    assert.equal(g.run.exitReason, C.KVM_EXIT_HLT, C.exitReasonName(g.run.exitReason));
    assert.equal(g.vcpu.getRegs().rip, BigInt(g.codeAddr + OUT_A.length));
  } finally {
    g.close();
  }
});

kvmTest("real mode: PIO IN exit, data written back lands in guest RAM", () => {
  const code = assemble(
    asm16.movDxImm(0x60),
    asm16.inAlDx(),
    asm16.movMemAl(0x2000),
    asm16.movDxImm(0x1234),
    asm16.inAxDx(),
    asm16.movMemAx(0x2002),
    asm16.hlt(),
  );
  const g = createRealModeVm(code);
  try {
    assert.equal(g.vcpu.run(), 0);
    assert.equal(g.run.exitReason, C.KVM_EXIT_IO);
    assert.equal(g.run.ioDirection, C.KVM_EXIT_IO_IN);
    assert.equal(g.run.ioPort, 0x60);
    assert.equal(g.run.ioSize, 1);
    g.run.data[g.run.ioDataOffset] = 0x5a;

    assert.equal(g.vcpu.run(), 0);
    assert.equal(g.run.exitReason, C.KVM_EXIT_IO);
    assert.equal(g.run.ioDirection, C.KVM_EXIT_IO_IN);
    assert.equal(g.run.ioPort, 0x1234);
    assert.equal(g.run.ioSize, 2);
    g.run.data[g.run.ioDataOffset] = 0xcd;
    g.run.data[g.run.ioDataOffset + 1] = 0xab;

    assert.equal(g.vcpu.run(), 0);
    assert.equal(g.run.exitReason, C.KVM_EXIT_HLT);
    assert.equal(g.mem[0x2000], 0x5a);
    assert.equal(g.mem[0x2002], 0xcd);
    assert.equal(g.mem[0x2003], 0xab);
    assert.equal(g.vcpu.getRegs().rax & 0xffffn, 0xabcdn);
  } finally {
    g.close();
  }
});

kvmTest("real mode: MMIO write and read exits to unmapped memory", () => {
  const code = assemble(
    asm16.movAxImm(0x8000),
    asm16.movDsAx(), // DS base 0x80000: outside the 64 KiB of RAM
    asm16.movMemImm8(0x10, 0x5a), // MMIO write at 0x80010
    asm16.movAlMem(0x20), // MMIO read at 0x80020
    asm16.xorBxBx(),
    asm16.movDsBx(),
    asm16.movMemAl(0x2000),
    asm16.hlt(),
  );
  const g = createRealModeVm(code);
  try {
    assert.equal(g.vcpu.run(), 0);
    assert.equal(g.run.exitReason, C.KVM_EXIT_MMIO, C.exitReasonName(g.run.exitReason));
    assert.equal(g.run.mmioPhysAddr, 0x80010);
    assert.equal(g.run.mmioLen, 1);
    assert.equal(g.run.mmioIsWrite, true);
    assert.equal(g.run.mmioData[0], 0x5a);

    assert.equal(g.vcpu.run(), 0);
    assert.equal(g.run.exitReason, C.KVM_EXIT_MMIO);
    assert.equal(g.run.mmioPhysAddr, 0x80020);
    assert.equal(g.run.mmioLen, 1);
    assert.equal(g.run.mmioIsWrite, false);
    g.run.mmioData[0] = 0x77;

    assert.equal(g.vcpu.run(), 0);
    assert.equal(g.run.exitReason, C.KVM_EXIT_HLT);
    assert.equal(g.mem[0x2000], 0x77);
  } finally {
    g.close();
  }
});

kvmTest("vcpu: regs, sregs, fpu, msrs, mp_state round-trip", () => {
  const g = createRealModeVm(OUT_A);
  try {
    const regs = g.vcpu.getRegs();
    REG_NAMES.forEach((n, i) => regs[n] = 0x1111_0000_0000_0000n + BigInt(i) * 0x1_0001n);
    regs.rip = BigInt(g.codeAddr);
    regs.rflags = 0x2n | 0x1n | 0x40n; // reserved bit 1, CF, ZF
    g.vcpu.setRegs(regs);
    assert.deepEqual(g.vcpu.getRegs(), regs);

    const s = g.vcpu.getSregs();
    s.es.base = 0x12340n;
    s.es.selector = 0x1234;
    s.gdt = { base: 0x5000n, limit: 0x27 };
    s.idt = { base: 0x6000n, limit: 0x3ff };
    g.vcpu.setSregs(s);
    const s2 = g.vcpu.getSregs();
    assert.equal(s2.es.base, 0x12340n);
    assert.equal(s2.es.selector, 0x1234);
    assert.deepEqual(s2.gdt, { base: 0x5000n, limit: 0x27 });
    assert.deepEqual(s2.idt, { base: 0x6000n, limit: 0x3ff });
    assert.equal(s2.cr0, s.cr0);

    g.vcpu.setFpu({ fcw: 0x27f, mxcsr: 0x1f80 });
    const f = g.vcpu.getFpu();
    assert.equal(f.fcw, 0x27f);
    assert.equal(f.fpr.length, 128);
    assert.equal(f.xmm.length, 256);
    // Note: KVM_GET_FPU does not report mxcsr (the kernel never copies it out); use XSAVE for it.
    const xsave = g.vcpu.getXsave();
    assert.equal(new DataView(xsave.buffer).getUint32(24, true), 0x1f80, "MXCSR in the XSAVE legacy area");

    const SYSENTER_CS = 0x174;
    assert.equal(g.vcpu.setMsrs([{ index: SYSENTER_CS, data: 0x10n }]), 1);
    assert.deepEqual(g.vcpu.getMsrs([SYSENTER_CS]), [{ index: SYSENTER_CS, data: 0x10n }]);

    assert.equal(g.vcpu.getMpState(), C.KVM_MP_STATE_RUNNABLE);
    g.vcpu.setMpState(C.KVM_MP_STATE_RUNNABLE);

    g.vcpu.setCpuid2(g.kvm.supportedCpuid());
    assert.ok(g.vcpu.getCpuid2().length > 4);

    // The guest still runs with the round-tripped state.
    const r = g.vcpu.getRegs();
    r.rip = BigInt(g.codeAddr);
    g.vcpu.setRegs(r);
    assert.equal(g.vcpu.run(), 0);
    assert.equal(g.run.exitReason, C.KVM_EXIT_IO);
  } finally {
    g.close();
  }
});

kvmTest("vcpu: immediate_exit makes KVM_RUN return -EINTR", () => {
  const g = createRealModeVm(assemble(asm16.jmpSelf()));
  try {
    assert.ok(g.kvm.checkExtension(C.KVM_CAP_IMMEDIATE_EXIT) > 0);
    g.run.immediateExit = 1;
    assert.equal(g.run.immediateExit, 1);
    for (let i = 0; i < 1000; i++) assert.equal(g.vcpu.run(), -EINTR);
    g.run.immediateExit = 0;
    assert.equal(g.vcpu.getRegs().rip, BigInt(g.codeAddr));
  } finally {
    g.close();
  }
});

kvmTest("vcpu: PIO ioeventfd signals the eventfd without a userspace exit", () => {
  const code = assemble(
    asm16.movDxImm(0x510),
    asm16.movAlImm(0x42),
    asm16.outDxAl(), // matches the ioeventfd: handled in the kernel
    asm16.movAlImm(0x43),
    asm16.outDxAl(), // datamatch mismatch: exits to userspace
    asm16.hlt(),
  );
  const g = createRealModeVm(code);
  const e = EventFd.create(C.EFD_NONBLOCK);
  try {
    g.vm.ioeventfd({ addr: 0x510, len: 1, eventfd: e.fd, pio: true, datamatch: 0x42 });
    assert.equal(g.vcpu.run(), 0);
    assert.equal(g.run.exitReason, C.KVM_EXIT_IO);
    assert.equal(g.run.data[g.run.ioDataOffset], 0x43);
    assert.equal(e.read(), 1n);
    assert.equal(g.vcpu.run(), 0);
    assert.equal(g.run.exitReason, C.KVM_EXIT_HLT);
    g.vm.ioeventfd({ addr: 0x510, len: 1, eventfd: e.fd, pio: true, datamatch: 0x42, deassign: true });
  } finally {
    e.close();
    g.close();
  }
});

kvmTest("vcpu: MMIO ioeventfd signals the eventfd without a userspace exit", () => {
  const code = assemble(
    asm16.movAxImm(0x8000),
    asm16.movDsAx(),
    asm16.movMemImm8(0x10, 0x01), // ioeventfd (any value, len 1)
    asm16.movMemImm8(0x18, 0x02), // plain MMIO exit
    asm16.hlt(),
  );
  const g = createRealModeVm(code);
  const e = EventFd.create(C.EFD_NONBLOCK);
  try {
    g.vm.ioeventfd({ addr: 0x80010, len: 1, eventfd: e.fd });
    assert.equal(g.vcpu.run(), 0);
    assert.equal(g.run.exitReason, C.KVM_EXIT_MMIO);
    assert.equal(g.run.mmioPhysAddr, 0x80018);
    assert.equal(e.read(), 1n);
  } finally {
    e.close();
    g.close();
  }
});

kvmTest("vm: in-kernel irqchip, PIT, GSI routing, irqfd, MSI, LAPIC (created before vCPUs)", () => {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const e1 = EventFd.create(C.EFD_NONBLOCK);
  const e2 = EventFd.create(C.EFD_NONBLOCK);
  const resample = EventFd.create(C.EFD_NONBLOCK);
  try {
    for (const cap of [C.KVM_CAP_IRQCHIP, C.KVM_CAP_PIT2, C.KVM_CAP_IRQ_ROUTING, C.KVM_CAP_IRQFD]) {
      assert.ok(vm.checkExtension(cap) > 0, `capability ${cap}`);
    }
    vm.setIdentityMapAddr(0xfffbc000);
    vm.setTssAddr(0xfffbd000);
    vm.createIrqchip();
    vm.createPit2(C.KVM_PIT_SPEAKER_DUMMY);
    vm.irqLine(4, 1);
    vm.irqLine(4, 0);
    const routes: Parameters<typeof vm.setGsiRouting>[0] = [];
    for (let pin = 0; pin < 24; pin++) {
      if (pin < 16 && pin !== 2) {
        routes.push({ gsi: pin, type: "irqchip", irqchip: pin < 8 ? 0 : 1, pin: pin % 8 });
      }
      routes.push({ gsi: pin, type: "irqchip", irqchip: C.KVM_IRQCHIP_IOAPIC, pin });
    }
    routes.push({ gsi: 24, type: "msi", addressLo: 0xfee00000, addressHi: 0, data: 0x30 });
    vm.setGsiRouting(routes);
    vm.irqfd(e1.fd, 24);
    vm.irqfd(e2.fd, 5, { resamplefd: resample.fd });
    e1.write();
    vm.irqfd(e1.fd, 24, { deassign: true });

    const vcpu = vm.createVcpu(0);
    try {
      const lapic = vcpu.getLapic();
      assert.equal(lapic.length, 1024);
      const version = new DataView(lapic.buffer).getUint32(0x30, true);
      assert.equal(version & 0xff, 0x14, "LAPIC version register");
      vcpu.setLapic(lapic);
      // MSI to APIC id 0, vector 0x30: delivered now that vCPU 0 exists (without a vCPU KVM returns EPERM).
      assert.ok(vm.signalMsi({ addressLo: 0xfee00000, addressHi: 0, data: 0x30 }) >= 0);
      assert.equal(vcpu.getMpState(), C.KVM_MP_STATE_RUNNABLE); // BSP
    } finally {
      vcpu.close();
    }
  } finally {
    e1.close();
    e2.close();
    resample.close();
    vm.close();
    kvm.close();
  }
});

kvmTest("vm: split irqchip (KVM_ENABLE_CAP) with MSI routes and irqfd", () => {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const e = EventFd.create(C.EFD_NONBLOCK);
  try {
    if (vm.checkExtension(C.KVM_CAP_SPLIT_IRQCHIP) <= 0) {
      console.log("skipped: KVM_CAP_SPLIT_IRQCHIP not supported");
      return;
    }
    vm.enableCap(C.KVM_CAP_SPLIT_IRQCHIP, [24]);
    vm.setGsiRouting([{ gsi: 5, type: "msi", addressLo: 0xfee00000, addressHi: 0, data: 0x31 }]);
    vm.irqfd(e.fd, 5);
    vm.irqfd(e.fd, 5, { deassign: true });
  } finally {
    e.close();
    vm.close();
    kvm.close();
  }
});

kvmTest("vm: irqchip after vCPU creation fails with EINVAL (ordering contract)", () => {
  const g = createRealModeVm(OUT_A);
  try {
    assert.throws(() => g.vm.createIrqchip(), (e: unknown) => e instanceof OsError && e.code === "EINVAL");
  } finally {
    g.close();
  }
});

kvmTest("vcpu kick: a Worker blocked in KVM_RUN returns -EINTR quickly", async () => {
  const g = createRealModeVm(assemble(asm16.jmpSelf()));
  const worker = new Worker(new URL("./helpers/vcpu_kick_worker.ts", import.meta.url), { type: "module" });
  try {
    const flags = new SharedArrayBuffer(8);
    const state = new Int32Array(flags);
    const messages: { thread?: bigint; ret?: number; exitReason?: number; endNs?: bigint }[] = [];
    let wake: (() => void) | null = null;
    worker.onmessage = (ev) => {
      messages.push(ev.data);
      wake?.();
    };
    const next = async (timeoutMs: number) => {
      const deadline = Date.now() + timeoutMs;
      while (messages.length === 0) {
        if (Date.now() > deadline) throw new Error("timed out waiting for the vCPU worker");
        await new Promise<void>((res) => {
          wake = res;
          setTimeout(res, 50);
        });
      }
      return messages.shift()!;
    };
    const desc: VcpuDescriptor = g.vcpu.descriptor();
    worker.postMessage({ vcpu: desc, flags, rounds: 2 });
    const { thread } = await next(10_000);
    assert.equal(typeof thread, "bigint");

    // Round 1: plain signal while the guest spins inside KVM_RUN.
    while (Atomics.load(state, 0) !== 1) await new Promise((r) => setTimeout(r, 5));
    await new Promise((r) => setTimeout(r, 150));
    assert.equal(messages.length, 0, "KVM_RUN returned before the kick");
    let t0 = nowNs();
    kick(thread!);
    let m = await next(3000).catch((e) => {
      g.run.immediateExit = 1; // unstick the worker so the test can end
      kick(thread!);
      throw e;
    });
    assert.equal(m.ret, -EINTR);
    let latencyMs = Number(m.endNs! - t0) / 1e6;
    assert.ok(latencyMs < 500, `kick latency ${latencyMs} ms`);

    // Round 2: immediate_exit + signal (the race-free protocol the vCPU workers use).
    Atomics.store(state, 1, 1);
    Atomics.notify(state, 1);
    while (Atomics.load(state, 0) !== 2) await new Promise((r) => setTimeout(r, 5));
    await new Promise((r) => setTimeout(r, 100));
    t0 = nowNs();
    g.run.immediateExit = 1;
    kick(thread!);
    m = await next(3000);
    assert.equal(m.ret, -EINTR);
    latencyMs = Number(m.endNs! - t0) / 1e6;
    assert.ok(latencyMs < 500, `kick latency ${latencyMs} ms`);
    assert.equal(g.run.immediateExit, 0, "worker cleared immediate_exit");
  } finally {
    worker.terminate();
    g.close();
  }
});
