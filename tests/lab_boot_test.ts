/**
 * Stock Debian guests under dvmm in the KVM lab: 2 vCPUs and 384 MiB as the guest sees them, the
 * command line, serial input, reboot, and the PVH entry of the ELF vmlinux. One lab session runs all
 * cases (tests/lab/boot_checks.sh) to keep the suite short.
 */
import assert from "node:assert/strict";
import { extractVmlinux } from "../vmm/loader/vmlinux_extract.ts";
import { type LabCase, labCases, labTail, labUnavailable, runInLab } from "./helpers/lab.ts";

const why = labUnavailable();
const root = new URL("../", import.meta.url).pathname;

function must(cases: Map<string, LabCase>, name: string, tail: (n: number) => string): LabCase {
  const c = cases.get(name);
  assert.ok(c, `case ${name} did not complete; lab output:\n${tail(6000)}`);
  return c;
}

Deno.test({
  name: "lab: stock Debian guest boots, takes serial input, reboots, and boots via PVH",
  ignore: why !== null,
}, async (t) => {
  // The PVH case boots the ELF vmlinux that the bzImage carries compressed.
  const pvhDir = `${root}build/lab-work/pvh`;
  await Deno.mkdir(pvhDir, { recursive: true });
  const bz = await Deno.readFile(`${root}build/lab/vmlinuz`);
  await Deno.writeFile(`${pvhDir}/vmlinux`, await extractVmlinux(bz));

  const res = await runInLab("sh /dvmm/tests/lab/boot_checks.sh /work/pvh/vmlinux", {
    add: [pvhDir],
    timeout: 400,
  });
  await Deno.remove(pvhDir, { recursive: true });
  // Keep the whole lab output for whoever reads a failure.
  await Deno.writeTextFile(
    `${root}build/lab-work/boot_checks.out`,
    res.stdout + "\n--- stderr ---\n" + res.stderr,
  );
  const cases = labCases(res.stdout);
  const tail = labTail(res);

  await t.step("2 vCPUs and 384 MiB as the guest reports them; cmdline passed; poweroff exits 0", () => {
    const c = must(cases, "smp2", tail);
    assert.match(c.output, /DVMM-GUEST: userspace up/);
    assert.match(c.output, /^cpus=2$/m);
    assert.match(c.output, /^2$/m, "two processors in /proc/cpuinfo");
    // KVM emulates the LAPIC's TSC-deadline mode: the guest is told so, and arms its timer that way.
    assert.match(c.output, /^tsc-deadline=yes\r?$/m, "tsc_deadline_timer in /proc/cpuinfo");
    assert.match(c.output, /^clockevent=lapic-deadline\r?$/m);
    const kb = Number(c.output.match(/^MemTotal:\s+(\d+) kB$/m)?.[1]);
    assert.ok(kb > 300 * 1024 && kb <= 384 * 1024, `MemTotal ${kb} kB for a 384 MiB guest`);
    assert.match(c.output, /^cmdline=console=ttyS0 quiet panic=-1 dvmm\.marker=smp2 /m);
    assert.match(c.output, /DVMM-GUEST: poweroff/);
    assert.equal(c.exit, 0, "dvmm exits 0 after guest poweroff");
  });

  await t.step("a line written to dvmm's stdin reaches the guest's shell on ttyS0", () => {
    const c = must(cases, "serial-input", tail);
    assert.match(c.output, /^serial-input-42\r?$/m, "the guest computed the value: the line was run");
    assert.equal(c.exit, 0);
  });

  await t.step("guest reboot boots the guest a second time", () => {
    const c = must(cases, "reboot", tail);
    const boots = c.output.match(/DVMM-GUEST: userspace up/g)?.length ?? 0;
    assert.ok(boots >= 2, `expected a second boot, saw ${boots}:\n${c.output.slice(-3000)}`);
    assert.match(c.output, /DVMM-GUEST: reboot/);
  });

  await t.step("the ELF vmlinux boots through its PVH entry with 2 vCPUs", () => {
    const c = must(cases, "pvh", tail);
    assert.match(c.output, /^pvh-cpus=2$/m);
    assert.equal(c.exit, 0);
  });
});
