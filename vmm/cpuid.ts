/**
 * Per-vCPU CPUID: KVM's supported table, patched with each vCPU's APIC id and the VM's topology.
 *
 * KVM reports what the host can virtualise but leaves identity fields (APIC ids, core counts) at
 * zero; the VMM fills them so the guest's view agrees with the ACPI MADT.
 */

import type { CpuidEntry } from "../ffi/structs.ts";

/** Topology of the VM: one socket, `cores` cores, one thread per core. */
export interface CpuTopology {
  /** vCPUs the guest may ever see (max_vcpus); sizes the APIC id space. */
  cores: number;
}

/** Features the VMM adds to KVM's supported table. */
export interface CpuidExtras {
  /**
   * KVM emulates the LAPIC's TSC-deadline mode (KVM_CAP_TSC_DEADLINE_TIMER). KVM's supported table
   * leaves the bit clear because the in-kernel LAPIC is the VMM's choice; with it set the guest arms
   * its timer with one MSR write and skips calibrating the LAPIC timer against the PIT at boot.
   */
  tscDeadline?: boolean;
}

const KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1;

/** Bits needed to number `n` items (0 for n ≤ 1). */
function idBits(n: number): number {
  let b = 0;
  while ((1 << b) < n) b++;
  return b;
}

/** Returns the CPUID entries for vCPU `apicId`, derived from KVM's supported table and `extras`. */
export function vcpuCpuid(
  supported: readonly CpuidEntry[],
  apicId: number,
  topo: CpuTopology,
  extras: CpuidExtras = {},
): CpuidEntry[] {
  const coreBits = idBits(topo.cores);
  const out: CpuidEntry[] = [];
  for (const src of supported) {
    const e = { ...src };
    switch (e.function) {
      case 0x1:
        // EBX: APIC id [31:24], logical processors per package [23:16], CLFLUSH size kept.
        e.ebx = ((apicId & 0xff) << 24) | ((Math.min(topo.cores, 255) & 0xff) << 16) | (e.ebx & 0xffff);
        e.ecx = (e.ecx | (1 << 31)) >>> 0; // running under a hypervisor
        if (extras.tscDeadline) e.ecx = (e.ecx | (1 << 24)) >>> 0; // TSC-deadline timer
        if (topo.cores > 1) e.edx = (e.edx | (1 << 28)) >>> 0; // HTT: multi-core package
        break;
      case 0x4:
        // Intel deterministic cache parameters: cores per package - 1 in EAX[31:26]; cache shared by one core.
        if ((e.eax & 0x1f) !== 0) e.eax = ((e.eax & 0x3ff) | (((topo.cores - 1) & 0x3f) << 26)) >>> 0;
        break;
      case 0xb:
      case 0x1f:
        e.edx = apicId;
        if (e.index === 0) { // SMT level: one thread per core
          e.eax = 0;
          e.ebx = 1;
          e.ecx = (1 << 8) | 0;
        } else if (e.index === 1) { // core level
          e.eax = coreBits;
          e.ebx = topo.cores;
          e.ecx = (2 << 8) | 1;
        } else {
          e.eax = 0;
          e.ebx = 0;
          e.ecx = e.index & 0xff;
        }
        e.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        break;
      case 0x80000008:
        // AMD: ApicIdSize [15:12] and NC (cores - 1) [7:0].
        e.ecx = ((e.ecx & ~0xf0ff) | (coreBits << 12) | ((topo.cores - 1) & 0xff)) >>> 0;
        break;
      case 0x8000001e:
        // AMD extended APIC id; one core per compute unit.
        e.eax = apicId;
        e.ebx = ((e.ebx & ~0xffff) | (apicId & 0xff)) >>> 0;
        e.ecx = 0;
        break;
    }
    out.push(e);
  }
  // Leaf 0xB needs subleaves 0..2 present for Linux to trust it; add them when KVM listed the leaf
  // with fewer.
  if (out.some((e) => e.function === 0xb)) {
    for (let i = 0; i < 3; i++) {
      if (!out.some((e) => e.function === 0xb && e.index === i)) {
        out.push({
          function: 0xb,
          index: i,
          flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
          eax: i === 1 ? coreBits : 0,
          ebx: i === 0 ? 1 : i === 1 ? topo.cores : 0,
          ecx: i === 0 ? 0x100 : i === 1 ? 0x201 : i,
          edx: apicId,
        });
      }
    }
  }
  return out;
}
