/**
 * The whole VM path on this machine's real /dev/kvm with tiny PVH guests: loader, vCPU workers,
 * the 16550 over shared state, the ACPI sleep register (poweroff), pause/resume and shutdown.
 */
import assert from "node:assert/strict";
import { VmConfigSchema } from "../api/schemas.ts";
import type { GuestEvent } from "../vmm/control.ts";
import { Vm } from "../vmm/vm.ts";
import { printAndPoweroffCode, pvhElf } from "./helpers/tiny_guest.ts";
import { kvmAvailable } from "./helpers/realmode.ts";

const ignore = !kvmAvailable();

async function guestVm(code: Uint8Array, vcpus = 1) {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-vm-test-" });
  await Deno.writeFile(`${dir}/guest.elf`, pvhElf(code));
  const config = VmConfigSchema.parse({
    cpus: { boot_vcpus: vcpus, max_vcpus: vcpus },
    memory: { size: 64 << 20 },
    payload: { kernel: `${dir}/guest.elf` },
    serial: { mode: "File", file: `${dir}/serial.out` },
    console: { mode: "Off" },
  });
  const vm = new Vm(config);
  const event = new Promise<GuestEvent>((resolve) => vm.onGuestEvent(resolve));
  return { vm, event, dir, output: () => Deno.readTextFile(`${dir}/serial.out`) };
}

Deno.test({ name: "guest prints on the serial port and powers off through the ACPI sleep register", ignore }, async () => {
  const g = await guestVm(printAndPoweroffCode("hello from a PVH guest\n"));
  await g.vm.boot();
  assert.equal(await g.event, "poweroff");
  await g.vm.shutdown();
  assert.equal(await g.output(), "hello from a PVH guest\n");
  await Deno.remove(g.dir, { recursive: true });
});

Deno.test({ name: "a 2-vCPU VM boots on the BSP while the AP waits for SIPI, and shuts down", ignore }, async () => {
  const g = await guestVm(printAndPoweroffCode("two cpus\n"), 2);
  await g.vm.boot();
  assert.equal(await g.event, "poweroff");
  await g.vm.shutdown();
  assert.equal(await g.output(), "two cpus\n");
  await Deno.remove(g.dir, { recursive: true });
});

Deno.test({ name: "a spinning guest can be paused, resumed and shut down from the host", ignore }, async () => {
  // jmp $ : the vCPU never exits on its own, so pause and shutdown must kick it out of KVM_RUN.
  const g = await guestVm(new Uint8Array([0xeb, 0xfe]), 2);
  await g.vm.boot();
  await g.vm.pause();
  await g.vm.resume();
  await g.vm.pause();
  await g.vm.shutdown();
  await g.vm.shutdown(); // idempotent
  await Deno.remove(g.dir, { recursive: true });
});

Deno.test({ name: "a kernel that does not exist fails boot with a clear error and releases the VM", ignore }, async () => {
  const config = VmConfigSchema.parse({ payload: { kernel: "/nonexistent/vmlinuz" }, console: { mode: "Off" } });
  const vm = new Vm(config);
  await assert.rejects(vm.boot(), /cannot read kernel \/nonexistent\/vmlinuz/);
});
