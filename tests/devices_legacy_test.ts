import assert from "node:assert/strict";
import { buildLegacyDevices, createLegacyDescriptors, type LegacyDeps } from "../devices/legacy.ts";
import { PioBus } from "../devices/bus.ts";
import { Layout } from "../vmm/layout.ts";

const MiB = 1024 * 1024;

function deps() {
  const out: number[] = [];
  const events: string[] = [];
  const irqs: string[] = [];
  const d: LegacyDeps = {
    serialIrq: { set: (l) => irqs.push(`com1:${l}`) },
    serialOut: { write: (b) => out.push(...b) },
    events: { request: (e) => events.push(e) },
    gedIrq: { set: (l) => irqs.push(`ged:${l}`) },
  };
  return { d, out, events, irqs };
}

Deno.test("legacy: descriptors clone; every thread's bus routes to the same devices", () => {
  const desc = createLegacyDescriptors({ lowMemBytes: 256 * MiB, cpus: 2, acpiPm: Layout.acpiPm });
  const cloned = structuredClone(desc); // what postMessage does to reach a vCPU worker
  const host = deps();
  const vcpu = deps();
  const h = buildLegacyDevices(desc, host.d);
  const { pio } = buildLegacyDevices(cloned, vcpu.d);

  // Serial: the vCPU writes, the sink of the writing thread gets the bytes.
  for (const c of new TextEncoder().encode("ok\n")) pio.write(0x3f8, 1, c);
  assert.equal(new TextDecoder().decode(new Uint8Array(vcpu.out)), "ok\n");
  // Host input becomes visible to the vCPU.
  h.serial.enqueueInput(new Uint8Array([0x41]));
  assert.equal(pio.read(0x3fd, 1) & 1, 1);
  assert.equal(pio.read(0x3f8, 1), 0x41);
  // CMOS memory size (above 16 MiB, 64 KiB units).
  pio.write(0x70, 1, 0x34);
  const lo = pio.read(0x71, 1);
  pio.write(0x70, 1, 0x35);
  assert.equal(lo | (pio.read(0x71, 1) << 8), 240 * MiB / 65536);
  // i8042 reset and ACPI events go to the events sink.
  pio.write(0x64, 1, 0xfe);
  pio.write(Layout.acpiPm.sleepControlPort, 1, Layout.acpiPm.s5ControlValue);
  pio.write(Layout.acpiPm.resetPort, 1, Layout.acpiPm.resetValue);
  assert.deepEqual(vcpu.events, ["reboot", "poweroff", "reboot"]);
  // Power button pressed on the host side, read by the guest through the vCPU's bus.
  h.acpiPm!.powerButton();
  assert.deepEqual(host.irqs, ["ged:true"]);
  assert.equal(pio.read(Layout.acpiPm.gedStatusPort, 1), 1);
  assert.deepEqual(vcpu.irqs, ["ged:false"]);
  assert.equal(pio.unhandledReads + pio.unhandledWrites, 0);
});

Deno.test("legacy: probed-but-absent ports are quiet, others are counted", () => {
  const { pio } = buildLegacyDevices(createLegacyDescriptors({ lowMemBytes: 64 * MiB }), deps().d);
  pio.write(0x80, 1, 0x12); // POST code / io_delay
  pio.write(0xed, 1, 0);
  for (const base of [0x2f8, 0x3e8, 0x2e8]) {
    pio.write(base + 1, 1, 0); // 8250 probing COM2-4 finds nothing
    assert.equal(pio.read(base + 1, 1), 0xff);
  }
  assert.equal(pio.unhandledReads + pio.unhandledWrites, 0);
  pio.read(0x378, 1); // parallel port: not claimed
  assert.equal(pio.unhandledReads, 1);
});

Deno.test("legacy: optional devices, shared bus, overlap with another device is an error", () => {
  const desc = createLegacyDescriptors({ lowMemBytes: 64 * MiB, i8042: false, acpiPm: false, quiet: [] });
  const pio = new PioBus();
  pio.register(0xcf8, 8, { pioRead: () => 0, pioWrite: () => {} }, "pci");
  const built = buildLegacyDevices(desc, deps().d, pio);
  assert.equal(built.pio, pio);
  assert.equal(built.i8042, null);
  assert.equal(built.acpiPm, null);
  assert.equal(pio.read(0x64, 1), 0xff);
  const clash = createLegacyDescriptors({ lowMemBytes: 64 * MiB, quiet: [[0xcfc, 1]] });
  const other = new PioBus();
  other.register(0xcf8, 8, { pioRead: () => 0, pioWrite: () => {} }, "pci");
  assert.throws(() => buildLegacyDevices(clash, deps().d, other), /absent at \[0xcfc, 0xcfd\) overlaps pci/);
});
