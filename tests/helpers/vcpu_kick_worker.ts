// Worker used by tests/ffi_test.ts: runs KVM_RUN on a vCPU created by the main thread, to test the kick
// (signal + immediate_exit) path. Protocol:
//   in:  { vcpu: VcpuDescriptor, flags: SharedArrayBuffer, rounds: number }
//   out: { thread: bigint } once, then per round { ret, exitReason, endNs }
//   flags[0] is set to the round number right before run() is entered.

import { kickInit, nowNs, threadSelf, type VcpuDescriptor, VcpuFd } from "../../ffi/kvm.ts";

interface Start {
  vcpu: VcpuDescriptor;
  flags: SharedArrayBuffer;
  rounds: number;
}

// deno-lint-ignore no-explicit-any
const scope = self as any;
scope.onmessage = (ev: MessageEvent<Start>) => {
  const { vcpu: desc, flags, rounds } = ev.data;
  const vcpu = VcpuFd.fromDescriptor(desc);
  const state = new Int32Array(flags);
  kickInit();
  scope.postMessage({ thread: threadSelf() });
  for (let round = 1; round <= rounds; round++) {
    Atomics.store(state, 0, round);
    const ret = vcpu.run();
    const endNs = nowNs();
    vcpu.kvmRun.immediateExit = 0;
    scope.postMessage({ ret, exitReason: vcpu.kvmRun.exitReason, endNs });
    // Wait for the main thread to allow the next round.
    Atomics.wait(state, 1, round - 1);
  }
};
