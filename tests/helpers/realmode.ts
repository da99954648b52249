// Tiny real-mode guests for native KVM tests: a VM with one slot of RAM at GPA 0 and one vCPU whose
// CS:IP points at hand-assembled 16-bit code. `asm16` encodes the handful of instructions the tests use.

import {
  type HostMapping,
  Kvm,
  type KvmRun,
  mapAnonymous,
  mappingBytes,
  unmap,
  type VcpuFd,
  type VmFd,
} from "../../ffi/kvm.ts";

export interface RealModeVm {
  kvm: Kvm;
  vm: VmFd;
  vcpu: VcpuFd;
  run: KvmRun;
  /** Guest RAM (GPA 0 .. memSize), a zero-copy view over the mapping. */
  mem: Uint8Array;
  mapping: HostMapping;
  codeAddr: number;
  close(): void;
}

export interface RealModeOptions {
  /** Guest RAM size (default 64 KiB, mapped at GPA 0). */
  memSize?: number;
  /** Linear address of the code (default 0x1000); CS base/selector are 0, so IP = codeAddr. */
  codeAddr?: number;
  /** Initial SP (default memSize - 16, capped to 0xfff0). */
  sp?: number;
}

/** True when /dev/kvm can be opened read-write (tests skip otherwise). */
export function kvmAvailable(): boolean {
  try {
    const f = Deno.openSync("/dev/kvm", { read: true, write: true });
    f.close();
    return true;
  } catch {
    return false;
  }
}

export function createRealModeVm(code: Uint8Array | number[], opts: RealModeOptions = {}): RealModeVm {
  const memSize = opts.memSize ?? 0x10000;
  const codeAddr = opts.codeAddr ?? 0x1000;
  const kvm = Kvm.open();
  const cleanups: (() => void)[] = [() => kvm.close()];
  const fail = (e: unknown): never => {
    for (const c of cleanups.reverse()) {
      try {
        c();
      } catch { /* best effort */ }
    }
    throw e;
  };
  try {
    const vm = kvm.createVm();
    cleanups.push(() => vm.close());
    const mapping = mapAnonymous(memSize);
    cleanups.push(() => unmap(mapping));
    vm.setUserMemoryRegion({
      slot: 0,
      guestPhysAddr: 0,
      memorySize: memSize,
      userspaceAddr: mapping.hostAddr,
    });
    const mem = mappingBytes(mapping);
    mem.set(code, codeAddr);
    const vcpu = vm.createVcpu(0);
    cleanups.push(() => vcpu.close());
    const sregs = vcpu.getSregs();
    for (const seg of [sregs.cs, sregs.ds, sregs.es, sregs.ss, sregs.fs, sregs.gs]) {
      seg.base = 0n;
      seg.selector = 0;
    }
    vcpu.setSregs(sregs);
    const regs = vcpu.getRegs();
    for (const k of Object.keys(regs) as (keyof typeof regs)[]) regs[k] = 0n;
    regs.rip = BigInt(codeAddr);
    regs.rflags = 2n;
    regs.rsp = BigInt(opts.sp ?? Math.min(memSize - 16, 0xfff0));
    vcpu.setRegs(regs);
    return {
      kvm,
      vm,
      vcpu,
      run: vcpu.kvmRun,
      mem,
      mapping,
      codeAddr,
      close() {
        for (const c of cleanups.reverse()) c();
        cleanups.length = 0;
      },
    };
  } catch (e) {
    return fail(e);
  }
}

const lo = (v: number) => v & 0xff;
const hi = (v: number) => (v >> 8) & 0xff;

/** 16-bit (real-mode) instruction encoders. */
export const asm16 = {
  movAlImm: (v: number) => [0xb0, lo(v)],
  movAxImm: (v: number) => [0xb8, lo(v), hi(v)],
  movBxImm: (v: number) => [0xbb, lo(v), hi(v)],
  movDxImm: (v: number) => [0xba, lo(v), hi(v)],
  /** mov ds, ax */
  movDsAx: () => [0x8e, 0xd8],
  /** mov ds, bx */
  movDsBx: () => [0x8e, 0xdb],
  /** xor bx, bx */
  xorBxBx: () => [0x31, 0xdb],
  /** mov [addr], al */
  movMemAl: (addr: number) => [0xa2, lo(addr), hi(addr)],
  /** mov [addr], ax */
  movMemAx: (addr: number) => [0xa3, lo(addr), hi(addr)],
  /** mov al, [addr] */
  movAlMem: (addr: number) => [0xa0, lo(addr), hi(addr)],
  /** mov byte [addr], imm8 */
  movMemImm8: (addr: number, v: number) => [0xc6, 0x06, lo(addr), hi(addr), lo(v)],
  outDxAl: () => [0xee],
  outDxAx: () => [0xef],
  inAlDx: () => [0xec],
  inAxDx: () => [0xed],
  /** out imm8, al */
  outImmAl: (port: number) => [0xe6, lo(port)],
  hlt: () => [0xf4],
  /** jmp $ (an infinite loop) */
  jmpSelf: () => [0xeb, 0xfe],
};

/** Concatenates encoded instructions into guest code bytes. */
export function assemble(...parts: number[][]): Uint8Array {
  return new Uint8Array(parts.flat());
}
