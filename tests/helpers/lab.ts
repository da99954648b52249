/**
 * Helpers for tests that run in the KVM lab (tests/lab/run): availability, running a command, and
 * splitting the output of scripts that print "=== CASE name" / "=== END name exit=N" sections.
 */

const root = new URL("../../", import.meta.url).pathname;

/** Exit code tests/lab/run uses for a lab fault (the lab VM itself failed): never a pass. */
export const LAB_FAULT = 125;

/** Why the lab cannot run here, or null when it can (QEMU and the lab scripts are present). */
export function labUnavailable(): string | null {
  if (Deno.env.get("DVMM_SKIP_LAB") === "1") return "DVMM_SKIP_LAB=1";
  try {
    Deno.statSync(`${root}tests/lab/run`);
  } catch {
    return "tests/lab/run is missing";
  }
  return null;
}

export interface LabResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * Runs COMMAND inside the lab and returns its output. A lab fault (the lab VM itself failed: it is not
 * a test result) is retried once, saying so on stderr; a second fault throws. So is a command that ran
 * into its timeout (LAB TIMEOUT): the nested lab now and then stalls a run for minutes with no sign on its
 * console, and a second run tells that apart from a hang of dvmm's own, which times out again.
 */
export async function runInLab(
  command: string,
  opts: { smp?: number; mem?: number; add?: string[]; timeout?: number } = {},
): Promise<LabResult> {
  try {
    return await runInLabOnce(command, opts);
  } catch (e) {
    if (!(e instanceof LabFault)) throw e;
    const reason = e.message.match(/^LAB (FAULT|TIMEOUT): .*$/m)?.[0] ?? "LAB FAULT";
    console.error(
      `${reason}\nlab fault, running the lab command once more; console tail:\n${e.message.slice(-1200)}`,
    );
    try {
      return await runInLabOnce(command, opts);
    } catch (e2) {
      // A second timeout is dvmm's own: the test sees the run as it ended.
      if (e2 instanceof LabFault && e2.run) return e2.run;
      throw e2;
    }
  }
}

/**
 * Runs a script of the test's own in the lab: a fresh host directory `build/lab-work/<prefix>-<time>`
 * holds `files` (name → text or bytes) and `run.sh` (made by `script` from the directory's name, which is
 * `/work/<name>` inside the lab); the lab runs `sh /work/<name>/run.sh`; the directory is removed after.
 */
export async function runScriptInLab(
  prefix: string,
  files: Record<string, string | Uint8Array>,
  script: (name: string) => string,
  opts: { timeout?: number } = {},
): Promise<LabResult> {
  const name = `${prefix}-${Date.now()}`;
  const dir = `${root}build/lab-work/${name}`;
  await Deno.mkdir(dir, { recursive: true });
  try {
    for (const [file, content] of Object.entries(files)) {
      if (typeof content === "string") await Deno.writeTextFile(`${dir}/${file}`, content);
      else await Deno.writeFile(`${dir}/${file}`, content);
    }
    await Deno.writeTextFile(`${dir}/run.sh`, script(name));
    return await runInLab(`sh /work/${name}/run.sh`, { add: [dir], timeout: opts.timeout });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** The lab VM failed (exit 125 from tests/lab/run): never a pass, never a test failure of dvmm. */
export class LabFault extends Error {
  /** A timed-out run's output (the command ran; whether the lab or dvmm stalled is not known). */
  run?: LabResult;
}

/** tests/lab/run's status when COMMAND ran into --timeout. */
const LAB_TIMEOUT = 124;

async function runInLabOnce(
  command: string,
  opts: { smp?: number; mem?: number; add?: string[]; timeout?: number } = {},
): Promise<LabResult> {
  const args = ["--smp", String(opts.smp ?? 2), "--timeout", String(opts.timeout ?? 900)];
  if (opts.mem) args.push("--mem", String(opts.mem));
  for (const a of opts.add ?? []) args.push("--add", a);
  const out = await new Deno.Command(`${root}tests/lab/run`, {
    args: [...args, "--", command],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const res = {
    code: out.code,
    stdout: new TextDecoder().decode(out.stdout),
    stderr: new TextDecoder().decode(out.stderr),
  };
  const timedOut = res.code === LAB_TIMEOUT && /^LAB TIMEOUT:/m.test(res.stderr);
  if (res.code === LAB_FAULT || timedOut) {
    const reason = res.stderr.match(/^LAB (FAULT|TIMEOUT): .*$/m)?.[0] ?? "LAB FAULT";
    const fault = new LabFault(`${reason} (not a test result)\n${res.stderr.slice(-4000)}`);
    if (timedOut) fault.run = res;
    throw fault;
  }
  return res;
}

/** One "=== CASE name" … "=== END name exit=N" section of a lab script's output. */
export interface LabCase {
  output: string;
  exit: number;
}

/** Splits output into its cases by name. */
export function labCases(stdout: string): Map<string, LabCase> {
  const cases = new Map<string, LabCase>();
  const re = /^=== CASE (\S+)\n([\s\S]*?)^=== END \1 exit=(\d+)$/gm;
  for (const m of stdout.matchAll(re)) cases.set(m[1], { output: m[2], exit: Number(m[3]) });
  return cases;
}

/**
 * A guest script as a raw disk (`dvmm.script=/dev/vda`, for scripts too long for the command line):
 * padded with zeros to whole sectors; the guest stops at the `exit` line added here.
 */
export function scriptDisk(text: string): Uint8Array {
  const bytes = new TextEncoder().encode(text.trim() + "\nexit 0\n");
  const out = new Uint8Array(Math.ceil(bytes.length / 512) * 512 + 512);
  out.set(bytes);
  return out;
}
