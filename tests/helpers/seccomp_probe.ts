/**
 * Test helper, run as its own process: `deno run -A seccomp_probe.ts MODE ACTION [ARG]` installs dvmm's
 * seccomp filters in MODE (true, log, errno, false) exactly as main.ts does, then makes one call:
 * - `symlink PATH`: symlinkat on the main (vmm) thread, which no dvmm thread needs;
 * - `vcpu-ioctl`: a worker confined as a vCPU thread makes a KVM request (allowed: KVM_GET_API_VERSION on
 *   /dev/kvm) and a terminal request (TCGETS, not KVM's).
 * Prints what happened on stdout, one line per step.
 */
import { confineThread, type SeccompMode, startSeccomp } from "../../vmm/seccomp.ts";
import { cstr, shim } from "../../ffi/shim.ts";

const KVM_GET_API_VERSION = 0xae00n;
const TCGETS = 0x5401n;

if (self.name === "vcpu-probe") {
  // First message: confine and make a KVM request; second: make a terminal request (after the main
  // thread printed the first answer, since a trap ends the process).
  self.onmessage = (ev: MessageEvent<{ kvm: number } | "tcgets">) => {
    if (ev.data === "tcgets") {
      const tc = Number(shim().kvs_ioctl(0, TCGETS, new Uint8Array(64)));
      self.postMessage(`tcgets: ${tc}`);
      return;
    }
    confineThread("vcpu");
    const api = Number(shim().kvs_ioctl_val(ev.data.kvm, KVM_GET_API_VERSION, 0n));
    self.postMessage(`kvm ioctl: ${api}`);
  };
} else {
  const [mode, action, arg] = Deno.args;
  startSeccomp(mode as SeccompMode);
  console.log("filtered");
  if (action === "symlink") {
    try {
      Deno.symlinkSync("/nonexistent-target", arg);
      console.log("symlink: made");
    } catch (e) {
      console.log(`symlink: ${(e as Error).name}`);
    }
  } else if (action === "vcpu-ioctl") {
    const kvm = Number(shim().kvs_open(cstr("/dev/kvm"), 2, 0));
    const w = new Worker(import.meta.url, { type: "module", name: "vcpu-probe" });
    let n = 0;
    await new Promise<void>((done) => {
      w.onmessage = (ev) => {
        console.log(ev.data);
        if (++n === 2) done();
        else w.postMessage("tcgets");
      };
      w.postMessage({ kvm });
    });
    w.terminate();
  }
  console.log("end");
}
