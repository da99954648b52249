import assert from "node:assert/strict";
import { GuestMemory } from "../vmm/memory.ts";
import { Layout, ramRegions } from "../vmm/layout.ts";
import {
  and,
  buffer,
  device,
  eisaId,
  eisaIdValue,
  extendedInterrupt,
  field,
  ifThen,
  int,
  ioPort,
  irqNoFlags,
  lengthValue,
  local,
  memory32Fixed,
  method,
  name,
  nameString,
  notify,
  pkgLength,
  pkgOf,
  qwordMemory,
  ref,
  resourceTemplate,
  scope,
  store,
  str,
  wordBusNumber,
} from "../vmm/acpi/aml.ts";
import { byteSum, FADT_FLAG, LAPIC_ENABLED, LAPIC_ONLINE_CAPABLE } from "../vmm/acpi/sdt.ts";
import { placeAcpiTables, writeAcpiTables } from "../vmm/acpi/tables.ts";

const MiB = 1024 * 1024;
const b = (...x: number[]) => Uint8Array.from(x);
const ascii = (s: string) => [...s].map((c) => c.charCodeAt(0));

// ---- AML encodings (expected bytes derived from the ACPI spec, section 20) ----

Deno.test("aml: PkgLength one to four bytes, counting its own length", () => {
  assert.deepEqual(pkgLength(0), b(0x01));
  assert.deepEqual(pkgLength(62), b(0x3f)); // 63 fits 6 bits
  assert.deepEqual(pkgLength(63), b(0x41, 0x04)); // 65 = 0x041
  assert.deepEqual(pkgLength(4092), b(0x4e, 0xff)); // 4094 = 0xFFE
  assert.deepEqual(pkgLength(4093), b(0x4f, 0xff)); // 4095 = 0xFFF, the 2-byte maximum
  assert.deepEqual(pkgLength(4094), b(0x81, 0x00, 0x01)); // 4097 = 0x01001 needs 3 bytes
  assert.deepEqual(pkgLength(0x12345), b(0x88, 0x34, 0x12)); // 0x12348
  assert.deepEqual(pkgLength(0x100000), b(0xc4, 0x00, 0x00, 0x01)); // 0x100004
  assert.throws(() => pkgLength(1 << 28));
  // Field bit widths use the same format without counting themselves.
  assert.deepEqual(lengthValue(8), b(0x08));
  assert.deepEqual(lengthValue(64), b(0x40, 0x04));
});

Deno.test("aml: integers use the shortest encoding", () => {
  assert.deepEqual(int(0), b(0x00));
  assert.deepEqual(int(1), b(0x01));
  assert.deepEqual(int(2), b(0x0a, 0x02));
  assert.deepEqual(int(0xff), b(0x0a, 0xff));
  assert.deepEqual(int(0x100), b(0x0b, 0x00, 0x01));
  assert.deepEqual(int(0x12345678), b(0x0c, 0x78, 0x56, 0x34, 0x12));
  assert.deepEqual(int(0x1_0000_0000), b(0x0e, 0, 0, 0, 0, 1, 0, 0, 0));
  assert.deepEqual(int(0xffff_ffff_ffff_ffffn), b(0xff));
  assert.throws(() => int(-1));
});

Deno.test("aml: names, strings, EISA ids", () => {
  assert.deepEqual(nameString("_S5"), b(...ascii("_S5_")));
  assert.deepEqual(nameString("\\_SB.COM1"), b(0x5c, 0x2e, ...ascii("_SB_COM1")));
  assert.deepEqual(nameString("\\_SB.PCI0.S08"), b(0x5c, 0x2f, 3, ...ascii("_SB_PCI0S08_")));
  assert.deepEqual(nameString("^PWRB"), b(0x5e, ...ascii("PWRB")));
  assert.deepEqual(nameString("\\"), b(0x5c, 0x00));
  assert.throws(() => nameString("toolong"));
  assert.deepEqual(str("ACPI0013"), b(0x0d, ...ascii("ACPI0013"), 0));
  assert.equal(eisaIdValue("PNP0C09"), 0x090cd041);
  assert.equal(eisaIdValue("PNP0A03"), 0x030ad041);
  assert.deepEqual(eisaId("PNP0501"), b(0x0c, 0x41, 0xd0, 0x05, 0x01));
});

Deno.test("aml: Name/Package/Scope/Device/Method/If/Field bytes", () => {
  assert.deepEqual(
    name("_S5", pkgOf(int(5), int(0), int(0), int(0))),
    b(0x08, ...ascii("_S5_"), 0x12, 0x07, 0x04, 0x0a, 0x05, 0x00, 0x00, 0x00),
  );
  assert.deepEqual(scope("\\_SB"), b(0x10, 0x06, 0x5c, ...ascii("_SB_")));
  assert.deepEqual(device("PWRB"), b(0x5b, 0x82, 0x05, ...ascii("PWRB")));
  // Method(_EVT, 1, Serialized) { Store(GDAT, Local0) }
  assert.deepEqual(
    method("_EVT", 1, true, store(ref("GDAT"), local(0))),
    b(0x14, 0x0c, ...ascii("_EVT"), 0x09, 0x70, ...ascii("GDAT"), 0x60),
  );
  // If (And(Local0, One)) { Notify(PWRB, 0x80) }
  assert.deepEqual(
    ifThen(and(local(0), int(1)), notify(ref("PWRB"), int(0x80))),
    b(0xa0, 0x0c, 0x7b, 0x60, 0x01, 0x00, 0x86, ...ascii("PWRB"), 0x0a, 0x80),
  );
  // Field(GDST, ByteAcc, NoLock, WriteAsZeros) { GDAT, 8 }
  assert.deepEqual(
    field("GDST", 1, false, 2, [{ name: "GDAT", bits: 8 }]),
    b(0x5b, 0x81, 0x0b, ...ascii("GDST"), 0x41, ...ascii("GDAT"), 0x08),
  );
  assert.deepEqual(buffer(b(1, 2)), b(0x11, 0x05, 0x0a, 0x02, 1, 2));
  // A large body switches to a 2-byte PkgLength.
  const big = scope("\\_SB", new Uint8Array(100));
  assert.deepEqual(big.subarray(0, 3), b(0x10, 0x4b, 0x06)); // 5 (name) + 100 + 2 (PkgLength) = 0x6B
  assert.equal((big[1] & 0x0f) | (big[2] << 4), big.length - 1);
});

Deno.test("aml: resource descriptors", () => {
  assert.deepEqual(ioPort(0x3f8, 0x3f8, 1, 8), b(0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08));
  assert.deepEqual(irqNoFlags(4), b(0x22, 0x10, 0x00));
  assert.deepEqual(
    memory32Fixed(0xe8000000, 0x10000000),
    b(0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xe8, 0x00, 0x00, 0x00, 0x10),
  );
  assert.deepEqual(extendedInterrupt([5], { edge: true }), b(0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0, 0, 0));
  assert.deepEqual(
    wordBusNumber(0, 255),
    b(0x88, 0x0d, 0x00, 0x02, 0x0c, 0x00, 0, 0, 0, 0, 0xff, 0, 0, 0, 0x00, 0x01),
  );
  const q = qwordMemory(0x1_0000_0000, 0x1_ffff_ffff);
  assert.equal(q.length, 46);
  assert.deepEqual(q.subarray(0, 6), b(0x8a, 0x2b, 0x00, 0x00, 0x0c, 0x01));
  assert.equal(new DataView(q.buffer).getBigUint64(38, true), 0x1_0000_0000n); // _LEN
  // ResourceTemplate: Buffer(size) { descriptors, EndTag }
  assert.deepEqual(resourceTemplate(irqNoFlags(4)), b(0x11, 0x08, 0x0a, 0x05, 0x22, 0x10, 0x00, 0x79, 0x00));
});

// ---- Tables ----

function tables(vcpus = 2, maxVcpus = 4, pci = true, pciSegments = 1) {
  const mem = GuestMemory.fromBuffers(ramRegions(256 * MiB));
  const p = placeAcpiTables(mem, { vcpus, maxVcpus, pci, pciSegments });
  const table = (addr: number) => mem.read(addr, mem.readU32(addr + 4));
  return { mem, p, table };
}

function sig(t: Uint8Array): string {
  return String.fromCharCode(...t.subarray(0, 4));
}

Deno.test("acpi: RSDP, XSDT and every table checksum to zero and are linked", () => {
  const { mem, p, table } = tables();
  assert.equal(p.rsdp, Layout.rsdpAddr);
  const rsdp = mem.read(p.rsdp, 36);
  assert.equal(String.fromCharCode(...rsdp.subarray(0, 8)), "RSD PTR ");
  assert.equal(byteSum(rsdp, 0, 20), 0);
  assert.equal(byteSum(rsdp, 0, 36), 0);
  assert.equal(rsdp[15], 2);
  assert.equal(mem.readU32(p.rsdp + 20), 36);
  assert.equal(mem.readU64(p.rsdp + 24), p.xsdt);

  const xsdt = table(p.xsdt);
  assert.equal(sig(xsdt), "XSDT");
  const n = (xsdt.length - 36) / 8;
  const entries = Array.from({ length: n }, (_, i) => mem.readU64(p.xsdt + 36 + 8 * i));
  assert.deepEqual(entries.map((a) => sig(table(a))), ["FACP", "APIC", "MCFG"]);
  for (const a of [p.xsdt, ...entries, p.dsdt]) {
    const t = table(a);
    assert.equal(byteSum(t), 0, `${sig(t)} checksum`);
    assert.equal(String.fromCharCode(...t.subarray(10, 16)), "DVMM  ");
    assert.ok(a >= Layout.acpiStart && a + t.length <= Layout.acpiEnd);
    assert.equal(a % 8, 0);
  }
  // Without PCI there is no MCFG.
  const np = tables(1, 1, false);
  assert.equal(np.p.mcfg, undefined);
  assert.equal(np.mem.readU32(np.p.xsdt + 4), 36 + 16);
  assert.equal(writeAcpiTables(GuestMemory.fromBuffers(ramRegions(16 * MiB)), { vcpus: 1 }), Layout.rsdpAddr);
});

Deno.test("acpi: FADT is hardware-reduced with sleep/reset registers at the PM ports", () => {
  const { mem, p, table } = tables();
  const f = table(p.fadt);
  const v = new DataView(f.buffer, f.byteOffset);
  assert.equal(f.length, 276);
  assert.equal(f[8], 6); // revision
  assert.equal(f[131], 5); // minor
  assert.equal(v.getUint32(40, true), p.dsdt);
  assert.equal(Number(v.getBigUint64(140, true)), p.dsdt);
  const flags = v.getUint32(112, true);
  assert.ok(flags & FADT_FLAG.HW_REDUCED_ACPI);
  assert.ok(flags & FADT_FLAG.RESET_REG_SUP);
  const gas = (off: number) => ({
    space: f[off],
    width: f[off + 1],
    access: f[off + 3],
    addr: Number(v.getBigUint64(off + 4, true)),
  });
  const pm = Layout.acpiPm;
  assert.deepEqual(gas(116), { space: 1, width: 8, access: 1, addr: pm.resetPort });
  assert.equal(f[128], pm.resetValue);
  assert.deepEqual(gas(244), { space: 1, width: 8, access: 1, addr: pm.sleepControlPort });
  assert.deepEqual(gas(256), { space: 1, width: 8, access: 1, addr: pm.sleepStatusPort });
  assert.equal(pm.s5ControlValue, 0x34);
  assert.equal(sig(mem.read(p.dsdt, 4)), "DSDT");
});

Deno.test("acpi: MADT has one LAPIC per possible vCPU, IOAPIC, overrides, NMI", () => {
  const { mem, p, table } = tables(3, 8);
  const t = table(p.madt);
  assert.equal(t[8], 5);
  assert.equal(mem.readU32(p.madt + 36), Layout.lapicAddr);
  const subs: { type: number; body: Uint8Array }[] = [];
  for (let o = 44; o < t.length;) {
    const len = t[o + 1];
    assert.ok(len >= 2);
    subs.push({ type: t[o], body: t.subarray(o, o + len) });
    o += len;
  }
  const lapics = subs.filter((s) => s.type === 0);
  assert.equal(lapics.length, 8);
  lapics.forEach((s, i) => {
    assert.equal(s.body[2], i, "processor UID");
    assert.equal(s.body[3], i, "APIC id");
    const fl = new DataView(s.body.buffer, s.body.byteOffset).getUint32(4, true);
    assert.equal(fl, i < 3 ? LAPIC_ENABLED : LAPIC_ONLINE_CAPABLE);
  });
  const io = subs.filter((s) => s.type === 1);
  assert.equal(io.length, 1);
  const iov = new DataView(io[0].body.buffer, io[0].body.byteOffset);
  assert.equal(iov.getUint32(4, true), Layout.ioapicAddr);
  assert.equal(iov.getUint32(8, true), 0);
  const isos = subs.filter((s) => s.type === 2).map((s) => {
    const d = new DataView(s.body.buffer, s.body.byteOffset);
    return { bus: s.body[2], irq: s.body[3], gsi: d.getUint32(4, true), flags: d.getUint16(8, true) };
  });
  assert.deepEqual(isos[0], { bus: 0, irq: 0, gsi: 2, flags: 0 });
  assert.deepEqual(isos[1], { bus: 0, irq: 9, gsi: 9, flags: 0x0d });
  const nmi = subs.filter((s) => s.type === 4);
  assert.equal(nmi.length, 1);
  assert.deepEqual([...nmi[0].body], [4, 6, 0xff, 0, 0, 1]);
  assert.throws(() => tables(4, 2), RangeError);
  assert.throws(() => tables(1, 256), RangeError);
});

Deno.test("acpi: MCFG points at the ECAM and describes bus 0 only (the one bus there is)", () => {
  const { mem, p } = tables();
  assert.equal(mem.readU32(p.mcfg! + 4), 60);
  assert.equal(mem.readU64(p.mcfg! + 44), Layout.pciEcamStart);
  assert.equal(mem.readU16(p.mcfg! + 52), 0);
  assert.equal(mem.readU8(p.mcfg! + 54), 0);
  // Buses 0..255 here would make Linux probe 255 empty buses with type-1 config cycles at boot.
  assert.equal(mem.readU8(p.mcfg! + 55), 0);
});

Deno.test("acpi: DSDT AML structure: \\_S5 then one \\_SB scope spanning the table", () => {
  const { table, p } = tables();
  const d = table(p.dsdt);
  const aml = d.subarray(36);
  const s5 = name("_S5", pkgOf(int(5), int(0), int(0), int(0)));
  assert.deepEqual(aml.subarray(0, s5.length), s5);
  let o = s5.length;
  assert.equal(aml[o], 0x10); // ScopeOp
  const lead = aml[o + 1];
  const extra = lead >> 6;
  let len = extra ? lead & 0x0f : lead & 0x3f;
  for (let i = 0; i < extra; i++) len |= aml[o + 2 + i] << (4 + 8 * i);
  o += 1 + len;
  assert.equal(o, aml.length, "scope PkgLength ends at the table end");
  const text = new TextDecoder("latin1").decode(aml);
  for (const n of ["ACPI0013", "_EVT", "GDAT", "COM1", "PCI0", "MBRD", "PWRB"]) {
    assert.ok(text.includes(n), n);
  }
});

// ---- iasl cross-check ----

function hasIasl(): boolean {
  try {
    return new Deno.Command("iasl", { args: ["-v"], stdout: "null", stderr: "null" }).outputSync().success;
  } catch {
    return false;
  }
}
const iasl = hasIasl();
if (!iasl) {
  console.warn("acpi_test: iasl not found (apt-get install acpica-tools); disassembly check skipped");
}

Deno.test({
  name: "acpi: iasl disassembles every table and recompiles the DSDT without errors or warnings",
  ignore: !iasl,
  async fn() {
    // Three PCI segments: a host bridge each (PCI0, PC01, PC02) and an MCFG entry each.
    const { mem, p } = tables(2, 4, true, 3);
    const dir = await Deno.makeTempDir({ prefix: "dvmm-acpi-" });
    try {
      const all: [string, number][] = [
        ["dsdt", p.dsdt],
        ["facp", p.fadt],
        ["apic", p.madt],
        ["mcfg", p.mcfg!],
        ["xsdt", p.xsdt],
      ];
      for (const [n, a] of all) {
        await Deno.writeFile(`${dir}/${n}.dat`, mem.read(a, mem.readU32(a + 4)));
        const out = await new Deno.Command("iasl", { args: ["-d", `${n}.dat`], cwd: dir }).output();
        const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
        assert.ok(out.success, `iasl -d ${n}: ${text}`);
        assert.doesNotMatch(text, /\berror\b/i, `${n}: ${text}`);
        const dsl = await Deno.readTextFile(`${dir}/${n}.dsl`);
        assert.doesNotMatch(dsl, /\*\*\*\* (Unknown|Invalid)/, `${n}.dsl flags a problem`);
      }
      const dsl = await Deno.readTextFile(`${dir}/dsdt.dsl`);
      for (const s of ["_S5", "PNP0501", "PNP0C0C", "ACPI0013", "PNP0A08", "Notify (\\_SB.PWRB, 0x80)"]) {
        assert.ok(dsl.includes(s), `DSDT disassembly lacks ${s}`);
      }
      for (const s of ["Device (PC01)", "Device (PC02)", "Name (_SEG, 0x02)"]) {
        assert.ok(dsl.includes(s), `DSDT disassembly lacks ${s}`);
      }
      const mcfgDsl = await Deno.readTextFile(`${dir}/mcfg.dsl`);
      assert.match(mcfgDsl, /Segment Group Number : 0002/, "MCFG has an entry for segment 2");
      assert.match(mcfgDsl, /Base Address : 00000000F8100000/, "segment 2's ECAM");
      const c = await new Deno.Command("iasl", { args: ["-p", `${dir}/re`, `${dir}/dsdt.dsl`], cwd: dir })
        .output();
      const ctext = new TextDecoder().decode(c.stdout) + new TextDecoder().decode(c.stderr);
      assert.ok(c.success, ctext);
      assert.match(ctext, /0 Errors, 0 Warnings/, ctext);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
