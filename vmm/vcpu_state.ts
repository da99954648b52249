/**
 * A vCPU's whole state, saved from and loaded into KVM for snapshots: registers, segment and control
 * registers, FPU/XSAVE, XCRs, debug registers, the local APIC, pending events, the MP state and every
 * MSR KVM lists (the TSC and kvmclock's among them). Structs are kept as KVM's raw bytes (base64), which
 * KVM's ABI keeps stable; MSRs as index/value pairs.
 */
import type { VcpuFd, VcpuRawState } from "../ffi/kvm.ts";
import { log } from "./log.ts";

/** One vCPU's saved state. */
export interface VcpuState {
  id: number;
  /** Raw KVM structs, base64. */
  raw: Partial<Record<VcpuRawState, string>>;
  /** MSR index → value (decimal string: values are 64-bit). */
  msrs: [number, string][];
}

const MSR_IA32_TSC = 0x10;
const MSR_TSC_DEADLINE = 0x6e0;

/** Structs saved, in the order they are loaded back (Cloud Hypervisor's and QEMU's order). */
const LOAD_ORDER: VcpuRawState[] = ["mp_state", "regs", "sregs", "fpu", "xsave", "xcrs", "lapic"];
/** Loaded after the MSRs: pending events and the debug registers. */
const LOAD_LAST: VcpuRawState[] = ["events", "debugregs"];
/** Structs a host may not have (the vCPU is saved without them; loading then skips them). */
const OPTIONAL = new Set<VcpuRawState>(["xsave", "xcrs", "debugregs"]);

export function toBase64(b: Uint8Array): string {
  let s = "";
  for (let i = 0; i < b.length; i += 0x8000) s += String.fromCharCode(...b.subarray(i, i + 0x8000));
  return btoa(s);
}

export function fromBase64(s: string): Uint8Array {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/**
 * Reads the MSRs of `indices` that KVM can read (KVM_GET_MSRS stops at the first it cannot; that one is
 * skipped and the rest read on).
 */
function readMsrs(fd: VcpuFd, indices: number[]): [number, bigint][] {
  const out: [number, bigint][] = [];
  let rest = indices;
  while (rest.length > 0) {
    const got = fd.getMsrs(rest);
    for (const e of got) out.push([e.index, e.data ?? 0n]);
    rest = rest.slice(got.length + 1);
  }
  return out;
}

/** Saves vCPU `fd` (not running: its thread is paused). `msrIndices`: KVM_GET_MSR_INDEX_LIST. */
export function saveVcpu(fd: VcpuFd, msrIndices: number[]): VcpuState {
  const raw: VcpuState["raw"] = {};
  for (const what of [...LOAD_ORDER, ...LOAD_LAST]) {
    try {
      raw[what] = toBase64(fd.getRaw(what));
    } catch (e) {
      if (!OPTIONAL.has(what)) throw new Error(`vCPU ${fd.id}: saving ${what}: ${(e as Error).message}`);
    }
  }
  const msrs = readMsrs(fd, msrIndices).map(([i, v]) => [i, v.toString()] as [number, string]);
  return { id: fd.id, raw, msrs };
}

/** Loads a saved state into a fresh vCPU (its CPUID already set). */
export function loadVcpu(fd: VcpuFd, s: VcpuState): void {
  const load = (what: VcpuRawState) => {
    const b64 = s.raw[what];
    if (b64 === undefined) {
      if (OPTIONAL.has(what)) return;
      throw new Error(`vCPU ${s.id}: the snapshot has no ${what}`);
    }
    fd.setRaw(what, fromBase64(b64));
  };
  for (const what of LOAD_ORDER) load(what);
  // The TSC first and the TSC deadline last: KVM arms the deadline timer against the TSC as it is when
  // the deadline is written, so a deadline loaded before the TSC would fire far too late (or never).
  const rank = (i: number) => i === MSR_IA32_TSC ? 0 : i === MSR_TSC_DEADLINE ? 2 : 1;
  const ordered = [...s.msrs].sort((a, b) => rank(a[0]) - rank(b[0]));
  // KVM stops at the first MSR it refuses: skip that one, set the rest, say which were refused.
  let rest = ordered.map(([index, v]) => ({ index, data: BigInt(v) }));
  const refused: number[] = [];
  while (rest.length > 0) {
    const n = fd.setMsrs(rest);
    if (n < rest.length) refused.push(rest[n].index);
    rest = rest.slice(n + 1);
  }
  if (refused.length > 0) {
    log.debug(`vCPU ${s.id}: MSRs not restored: ${refused.map((i) => "0x" + i.toString(16)).join(" ")}`);
  }
  for (const what of LOAD_LAST) load(what);
}
