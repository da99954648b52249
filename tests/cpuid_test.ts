import assert from "node:assert/strict";
import { vcpuCpuid } from "../vmm/cpuid.ts";
import type { CpuidEntry } from "../ffi/structs.ts";
import { Kvm } from "../ffi/kvm.ts";
import { kvmAvailable } from "./helpers/realmode.ts";

const leaf = (fn: number, index = 0, r: Partial<CpuidEntry> = {}): CpuidEntry => ({
  function: fn,
  index,
  flags: 0,
  eax: 0,
  ebx: 0,
  ecx: 0,
  edx: 0,
  ...r,
});

function find(t: CpuidEntry[], fn: number, index = 0): CpuidEntry {
  const e = t.find((x) => x.function === fn && x.index === index);
  assert.ok(e, `leaf 0x${fn.toString(16)}.${index} present`);
  return e;
}

Deno.test("leaf 1 carries the vCPU's APIC id, the package's logical count, HTT and the hypervisor bit", () => {
  const base = [leaf(1, 0, { ebx: 0x0000_0800, ecx: 0, edx: 0 })];
  const t = vcpuCpuid(base, 3, { cores: 4 });
  const l1 = find(t, 1);
  assert.equal(l1.ebx >>> 24, 3);
  assert.equal((l1.ebx >>> 16) & 0xff, 4);
  assert.equal(l1.ebx & 0xffff, 0x0800, "CLFLUSH line size kept");
  assert.ok(l1.ecx & (1 << 31));
  assert.ok(l1.edx & (1 << 28));
  assert.equal(find(vcpuCpuid(base, 0, { cores: 1 }), 1).edx & (1 << 28), 0, "no HTT with one core");
});

Deno.test("leaf 0xB describes one thread per core and the core level, with the x2APIC id in EDX", () => {
  const t = vcpuCpuid([leaf(0xb, 0)], 5, { cores: 6 });
  const smt = find(t, 0xb, 0), core = find(t, 0xb, 1), end = find(t, 0xb, 2);
  assert.deepEqual([smt.eax, smt.ebx, (smt.ecx >> 8) & 0xff, smt.edx], [0, 1, 1, 5]);
  assert.deepEqual([core.eax, core.ebx, (core.ecx >> 8) & 0xff, core.edx], [3, 6, 2, 5]);
  assert.equal((end.ecx >> 8) & 0xff, 0, "level 2 is invalid: the list ends");
  assert.ok(t.filter((e) => e.function === 0xb).every((e) => e.flags & 1), "index is significant");
});

Deno.test("AMD leaves carry the core count and the extended APIC id", () => {
  const t = vcpuCpuid([leaf(0x80000008, 0, { ecx: 0xffff_ffff }), leaf(0x8000001e, 0, { ebx: 0xffff })], 2, {
    cores: 3,
  });
  const l8 = find(t, 0x80000008);
  assert.equal(l8.ecx & 0xff, 2, "NC = cores - 1");
  assert.equal((l8.ecx >> 12) & 0xf, 2, "APIC id size: 2 bits for 3 cores");
  assert.equal(find(t, 0x8000001e).eax, 2);
  assert.equal(find(t, 0x8000001e).ebx & 0xffff, 2, "compute unit id 2, one thread per unit");
});

Deno.test({
  name: "KVM's supported table patched for vCPU 1 of 2 is accepted by KVM_SET_CPUID2",
  ignore: !kvmAvailable(),
}, () => {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  try {
    vm.createIrqchip();
    vm.createVcpu(0);
    const vcpu = vm.createVcpu(1);
    const t = vcpuCpuid(kvm.supportedCpuid(), 1, { cores: 2 });
    vcpu.setCpuid2(t);
    const back = vcpu.getCpuid2();
    assert.equal(find(back, 1).ebx >>> 24, 1);
  } finally {
    vm.close();
    kvm.close();
  }
});

Deno.test("leaf 1 announces the TSC-deadline timer only when KVM emulates it", () => {
  const base = [leaf(1, 0, { ecx: 1 })];
  assert.ok(find(vcpuCpuid(base, 0, { cores: 1 }, { tscDeadline: true }), 1).ecx & (1 << 24));
  assert.equal(find(vcpuCpuid(base, 0, { cores: 1 }), 1).ecx & (1 << 24), 0);
  assert.equal(
    find(vcpuCpuid(base, 0, { cores: 1 }, { tscDeadline: true }), 1).ecx & 1,
    1,
    "other bits kept",
  );
});
