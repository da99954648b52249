import assert from "node:assert/strict";
import { EVENT_SOURCE_NAMES } from "../devices/shared.ts";
import { AcpiPm, GED_EVENT } from "../devices/acpi_pm.ts";
import { Layout } from "../vmm/layout.ts";
import { PioBus } from "../devices/bus.ts";

function pm() {
  const events: string[] = [];
  const irq: boolean[] = [];
  const d = AcpiPm.createDescriptor(Layout.acpiPm);
  const dev = new AcpiPm(d, {
    events: { request: (e, by) => events.push(`${e} by ${EVENT_SOURCE_NAMES[by]}`) },
    gedIrq: { set: (l) => irq.push(l) },
  });
  const bus = new PioBus();
  bus.register(dev.base, dev.len, dev, "acpi_pm");
  return { dev, bus, events, irq, d };
}

Deno.test("acpi_pm: follows the ACPI layout (ports, block, values)", () => {
  const { d } = pm();
  assert.equal(d.base, Layout.acpiPm.sleepControlPort);
  assert.equal(d.len, Layout.acpiPm.portCount);
  assert.equal(d.resetPort, Layout.acpiPm.resetPort);
  assert.equal(d.gedStatusPort, Layout.acpiPm.gedStatusPort);
  assert.equal(d.gedGsi, Layout.acpiPm.gedGsi);
  assert.deepEqual(structuredClone(d).base, d.base);
  // The defaults match the layout too.
  const def = AcpiPm.createDescriptor();
  for (
    const k of ["sleepControlPort", "sleepStatusPort", "resetPort", "resetValue", "gedStatusPort"] as const
  ) {
    assert.equal(def[k], Layout.acpiPm[k], k);
  }
  assert.equal(def.s5SleepType, Layout.acpiPm.s5SleepType);
});

Deno.test("acpi_pm: SLP_EN with SLP_TYP=S5 powers off; other writes do not", () => {
  const { bus, events, dev } = pm();
  const ctl = Layout.acpiPm.sleepControlPort;
  bus.write(ctl, 1, 5 << 2); // type without SLP_EN
  bus.write(ctl, 1, 0x20 | (3 << 2)); // S3: unsupported, wakes at once
  assert.deepEqual(events, []);
  assert.equal(bus.read(Layout.acpiPm.sleepStatusPort, 1), 0x80);
  bus.write(Layout.acpiPm.sleepStatusPort, 1, 0x80);
  assert.equal(bus.read(Layout.acpiPm.sleepStatusPort, 1), 0);
  bus.write(ctl, 1, Layout.acpiPm.s5ControlValue);
  assert.deepEqual(events, ["poweroff by ACPI sleep control register"]);
  assert.deepEqual(dev.stats(), { poweroffs: 1, resets: 0, otherSleeps: 1 });
});

Deno.test("acpi_pm: the reset register reboots on the reset value only", () => {
  const { bus, events } = pm();
  bus.write(Layout.acpiPm.resetPort, 1, 0x02);
  assert.deepEqual(events, []);
  bus.write(Layout.acpiPm.resetPort, 1, Layout.acpiPm.resetValue);
  assert.deepEqual(events, ["reboot by ACPI reset register"]);
});

Deno.test("acpi_pm: power button through the GED: line up, read returns and clears", () => {
  const { bus, dev, irq } = pm();
  const ged = Layout.acpiPm.gedStatusPort;
  assert.equal(bus.read(ged, 1), 0);
  dev.powerButton();
  assert.deepEqual(irq, [true]);
  dev.powerButton(); // still pending: no new edge
  assert.deepEqual(irq, [true]);
  assert.equal(bus.read(ged, 1), GED_EVENT.POWER_BUTTON);
  assert.deepEqual(irq, [true, false]);
  assert.equal(bus.read(ged, 1), 0);
  dev.raiseEvent(0x03);
  bus.write(ged, 1, 0x01); // write-1-to-clear
  assert.equal(dev.pendingEvents, 0x02);
  assert.deepEqual(irq, [true, false, true]);
  // Unused ports of the block are quiet (claimed, read 0).
  assert.equal(bus.read(Layout.acpiPm.sleepControlPort + 0x0f, 1), 0);
  assert.equal(bus.unhandledReads, 0);
});

Deno.test("acpi_pm: registers may be placed anywhere; clashes are refused", () => {
  const d = AcpiPm.createDescriptor({
    sleepControlPort: 0x3c0,
    sleepStatusPort: 0x3c1,
    resetPort: 0x3c4,
    gedStatusPort: 0x3c8,
  });
  assert.equal(d.base, 0x3c0);
  assert.equal(d.len, 9);
  assert.throws(() => AcpiPm.createDescriptor({ resetPort: 0x600 }), RangeError);
});
