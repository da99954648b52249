/**
 * Native start-up and footprint, dvmm beside QEMU on this host's /dev/kvm (tiny PVH guests run here, even
 * on PVM; stock kernels need the lab: tests/bench/boot).
 *
 *   deno run -A tests/bench/native_bench.ts [--rounds 7] [--dvmm build/dvmm] [--qemu qemu-system-x86_64]
 *
 * - start-up: launch → the guest's first serial line. The guest's first instruction prints "hello" on
 *   COM1 and powers off (ACPI), so this is the VMM's start-up plus one guest instruction stream. Medians of
 *   N rounds, dvmm and QEMU alternating. QEMU: microvm, `-cpu host,-arch-capabilities` (PVM refuses that
 *   MSR), PVH entry from the same ELF.
 * - exit round trip: a guest reads the serial line-status register (port 0x3fd) 200,000 times before it
 *   prints, as Linux's console does for every byte; (its time − the plain start-up) / 200,000 is the cost
 *   of one port-I/O exit handled by the VMM: the lab's boots are ~50,000 such exits, most of them this.
 * - footprint: resident memory (VmRSS, and its anonymous part RssAnon) of the VMM process with a 64 MiB guest
 *   spinning in `jmp $` (it touches no RAM), for 1, 2 and 8 vCPUs, and with 4 virtio devices (disk, rng,
 *   balloon, console). dvmm's breakdown: each vCPU and each device is one Worker (a V8 isolate): the slope
 *   of RSS over vCPUs is the cost of one isolate.
 *
 * Last line (machine-readable): `native: dvmm_startup_ms=… qemu_startup_ms=… ratio=… dvmm_rss_1_mib=…
 * qemu_rss_1_mib=… …`
 */
import { parseArgs } from "node:util";
import { printAndPoweroffCode, pvhElf } from "../helpers/tiny_guest.ts";

const args = parseArgs({
  options: {
    rounds: { type: "string", default: "7" },
    dvmm: { type: "string", default: new URL("../../build/dvmm", import.meta.url).pathname },
    qemu: { type: "string", default: "qemu-system-x86_64" },
  },
});
const rounds = Number(args.values.rounds);
const dir = await Deno.makeTempDir({ prefix: "dvmm-native-bench-" });
const hello = `${dir}/hello.elf`;
const spin = `${dir}/spin.elf`;
const disk = `${dir}/disk.img`;
await Deno.writeFile(hello, pvhElf(printAndPoweroffCode("hello\n")));
// mov dx, 0x3fd ; mov ecx, EXITS ; 1: in al, dx ; dec ecx ; jnz 1b ; then print "hello" and power off.
const EXITS = 200_000;
const loopPrefix = [
  0x66,
  0xba,
  0xfd,
  0x03,
  0xb9,
  EXITS & 0xff,
  (EXITS >> 8) & 0xff,
  EXITS >> 16,
  0,
  0xec,
  0x49,
  0x75,
  0xfc,
];
const exitsElf = `${dir}/exits.elf`;
await Deno.writeFile(
  exitsElf,
  pvhElf(new Uint8Array([...loopPrefix, ...printAndPoweroffCode("hello\n", 0x100000 + loopPrefix.length)])),
);
await Deno.writeFile(spin, pvhElf(new Uint8Array([0xeb, 0xfe])));
await Deno.writeFile(disk, new Uint8Array(1 << 20));

const QEMU_BASE = [
  "-accel",
  "kvm",
  "-M",
  "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=on,pcie=on",
  "-cpu",
  "host,-arch-capabilities",
  "-m",
  "64M",
  "-nodefaults",
  "-no-user-config",
  "-display",
  "none",
  "-no-reboot",
];

/** ms from spawn to the first stdout line containing `hello`; the process is then ended. */
async function startup(cmd: string, argv: string[]): Promise<number> {
  const t0 = performance.now();
  const child = new Deno.Command(cmd, { args: argv, stdin: "null", stdout: "piped", stderr: "null" }).spawn();
  const reader = child.stdout.getReader();
  let text = "";
  let at = -1;
  const dec = new TextDecoder();
  while (at < 0) {
    const { value, done } = await reader.read();
    if (done) break;
    text += dec.decode(value);
    if (text.includes("hello")) at = performance.now() - t0;
  }
  try {
    child.kill("SIGKILL");
  } catch { /* exited */ }
  reader.releaseLock();
  await child.stdout.cancel().catch(() => {});
  await child.status;
  if (at < 0) throw new Error(`${cmd} printed no hello: ${text.slice(-500)}`);
  return at;
}

function status(pid: number): { rss: number; anon: number; threads: number } {
  const s = Deno.readTextFileSync(`/proc/${pid}/status`);
  const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+)`, "m").exec(s)?.[1] ?? 0);
  return { rss: kb("VmRSS") / 1024, anon: kb("RssAnon") / 1024, threads: kb("Threads") };
}

/** RSS of a VMM running the spinning guest, once it has settled (the largest of three samples, 1 s apart). */
async function footprint(
  cmd: string,
  argv: string[],
  readyThreads: number,
): Promise<{ rss: number; anon: number }> {
  const child = new Deno.Command(cmd, { args: argv, stdin: "null", stdout: "null", stderr: "piped" }).spawn();
  try {
    const deadline = performance.now() + 30_000;
    while (status(child.pid).threads < readyThreads && performance.now() < deadline) {
      await new Promise((r) => setTimeout(r, 100));
    }
    let best = { rss: 0, anon: 0 };
    for (let i = 0; i < 3; i++) {
      await new Promise((r) => setTimeout(r, 1000));
      const s = status(child.pid);
      if (s.rss > best.rss) best = { rss: s.rss, anon: s.anon };
    }
    return best;
  } finally {
    let early = false;
    try {
      child.kill("SIGKILL");
    } catch {
      early = true;
    }
    const out = await child.output();
    if (early) {
      console.error(`${cmd} ended early (${out.code}): ${new TextDecoder().decode(out.stderr).slice(-2000)}`);
    }
  }
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const f1 = (x: number) => x.toFixed(1);

// ---- start-up ----
const dvmmHello = ["--kernel", hello, "--memory", "size=64M", "--serial", "tty", "--console", "off"];
const qemuHello = [...QEMU_BASE, "-smp", "1", "-serial", "stdio", "-kernel", hello];
await startup(args.values.dvmm, dvmmHello); // warm the page cache
await startup(args.values.qemu, qemuHello);
const dv: number[] = [];
const qe: number[] = [];
for (let r = 0; r < rounds; r++) {
  const order = r % 2 === 0 ? ["d", "q"] : ["q", "d"];
  for (const o of order) {
    if (o === "d") dv.push(await startup(args.values.dvmm, dvmmHello));
    else qe.push(await startup(args.values.qemu, qemuHello));
  }
}
console.log(`start-up, launch → guest's first line (ms), ${rounds} rounds`);
console.log(`  dvmm: median ${f1(median(dv))}  [${dv.map(f1).join(" ")}]`);
console.log(`  qemu: median ${f1(median(qe))}  [${qe.map(f1).join(" ")}]`);

// ---- exit round trip ----
const dvx: number[] = [];
const qex: number[] = [];
for (let r = 0; r < rounds; r++) {
  dvx.push(await startup(args.values.dvmm, dvmmHello.map((a) => a === hello ? exitsElf : a)));
  qex.push(await startup(args.values.qemu, qemuHello.map((a) => a === hello ? exitsElf : a)));
}
const perExit = (xs: number[], base: number[]) => ((median(xs) - median(base)) * 1000) / EXITS;
console.log(`port-I/O exit round trip (µs), ${EXITS} reads of port 0x3fd, ${rounds} rounds`);
console.log(`  dvmm: ${perExit(dvx, dv).toFixed(2)}   qemu: ${perExit(qex, qe).toFixed(2)}`);

// ---- footprint ----
const devicesDvmm = [
  "--disk",
  `path=${disk}`,
  "--balloon",
  "size=0",
  "--console",
  `file=${dir}/console.out`,
];
const devicesQemu = [
  "-drive",
  `file=${disk},format=raw,if=none,id=d0`,
  "-device",
  "virtio-blk-pci,drive=d0",
  "-device",
  "virtio-rng-pci",
  "-device",
  "virtio-balloon-pci",
  "-chardev",
  `file,id=c0,path=${dir}/qconsole.out`,
  "-device",
  "virtio-serial-pci",
  "-device",
  "virtconsole,chardev=c0",
];
const rows: { what: string; d: { rss: number; anon: number }; q: { rss: number; anon: number } }[] = [];
for (
  const [what, cpus, devices] of [["1 vCPU", 1, false], ["2 vCPUs", 2, false], ["8 vCPUs", 8, false], [
    "2 vCPUs + 4 virtio devices",
    2,
    true,
  ]] as const
) {
  const d = await footprint(
    args.values.dvmm,
    [
      "--kernel",
      spin,
      "--memory",
      "size=64M",
      "--cpus",
      `boot=${cpus}`,
      "--serial",
      "null",
      ...(devices ? devicesDvmm : ["--console", "off"]),
    ],
    cpus + 1,
  );
  const q = await footprint(
    args.values.qemu,
    [...QEMU_BASE, "-smp", String(cpus), "-serial", "null", "-kernel", spin, ...(devices ? devicesQemu : [])],
    cpus + 1,
  );
  rows.push({ what, d, q });
}
console.log("footprint, VMM resident memory with a 64 MiB spinning guest (MiB: RSS / anonymous)");
for (const r of rows) {
  console.log(
    `  ${r.what.padEnd(28)} dvmm ${f1(r.d.rss).padStart(6)} / ${f1(r.d.anon).padStart(6)}   qemu ${
      f1(r.q.rss).padStart(6)
    } / ${f1(r.q.anon).padStart(6)}   ratio ${(r.d.rss / r.q.rss).toFixed(2)}`,
  );
}
const perVcpu = (rows[2].d.rss - rows[0].d.rss) / 7;
const perDevice = (rows[3].d.rss - rows[1].d.rss) / 4;
console.log(
  `  dvmm: each vCPU worker ≈ ${f1(perVcpu)} MiB; each virtio device ≈ ${f1(perDevice)} MiB ` +
    `(the disk has an isolate of its own, rng, balloon and console share one)`,
);
console.log(
  `native: dvmm_startup_ms=${f1(median(dv))} qemu_startup_ms=${f1(median(qe))} ratio=${
    (median(dv) / median(qe)).toFixed(2)
  } dvmm_exit_us=${perExit(dvx, dv).toFixed(2)} qemu_exit_us=${perExit(qex, qe).toFixed(2)} ${
    rows.map((r, i) =>
      `dvmm_rss_${["1", "2", "8", "2dev"][i]}_mib=${f1(r.d.rss)} qemu_rss_${["1", "2", "8", "2dev"][i]}_mib=${
        f1(r.q.rss)
      }`
    ).join(" ")
  } rounds=${rounds}`,
);
await Deno.remove(dir, { recursive: true });
