/**
 * The head start of a command-line VM: its vCPU workers start before the boot asks for them, and the
 * boot takes those instead of making new ones; under Landlock there is none (the rules come with
 * vm.create and bind only threads started after).
 */
import assert from "node:assert/strict";
import { VmConfigSchema } from "../vmm/vm_config.ts";
import { prewarmVcpus, workerPool } from "../vmm/vm.ts";
import { workerUrl } from "../vmm/worker_pool.ts";

const vcpuWorker = workerUrl("./vcpu_worker.ts", new URL("../vmm/vm.ts", import.meta.url).href);
const config = (extra: Record<string, unknown> = {}) =>
  VmConfigSchema.parse({
    cpus: { boot_vcpus: 3, max_vcpus: 4 },
    payload: { kernel: "/nonexistent" },
    ...extra,
  });

Deno.test("a command-line VM's vCPU workers start ahead of its boot, one per boot vCPU", () => {
  try {
    prewarmVcpus(config());
    assert.equal(workerPool.idle(vcpuWorker), 3);
    const w = workerPool.take(vcpuWorker);
    assert.equal(workerPool.idle(vcpuWorker), 2, "the boot takes a started worker");
    w.terminate();
  } finally {
    workerPool.drain();
  }
  assert.equal(workerPool.idle(vcpuWorker), 0, "drain ends the ones nobody took");
});

Deno.test("no head start under Landlock", () => {
  try {
    prewarmVcpus(config({ landlock_enable: true }));
    assert.equal(workerPool.idle(vcpuWorker), 0);
  } finally {
    workerPool.drain();
  }
});
