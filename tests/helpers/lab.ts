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
 * The lines of a lab run that say what went wrong, first, for an assertion message (CI shows the first
 * lines of each failure): the runner's LAB TIMEOUT, a host script's own markers (`GONE`, `HUNG`,
 * `NO-…`, `NOT-…`, `SILENT …`), and dvmm's report of a guest reset or triple fault (with -v: "guest event:
 * reboot (keyboard controller reset line)"…), which a test guest that resets unexpectedly leaves. Empty when
 * there are none.
 */
export function labTrouble(res: LabResult): string {
  const text = res.stdout + "\n" + res.stderr;
  const re =
    /^(LAB (FAULT|TIMEOUT):.*|GONE:.*|HUNG .*|NO-[A-Z-]+|NOT-[A-Z-]+.*|SILENT .*|.*guest event: reboot.*|.*triple fault.*)$/gm;
  return [...text.matchAll(re)]
    .map((m) => m[0].slice(0, 200)).join(" | ");
}

/**
 * Runs COMMAND inside the lab and returns its output. A lab fault (the lab VM itself failed: its kernel
 * panicked or its console shows a stalled vCPU; not a test result) is retried, saying so on stderr, up to
 * three more times while the suite's lab budget allows; then it throws. A command that ran into its timeout
 * (LAB TIMEOUT) is run once more: the nested lab now and then stalls a run for minutes with no sign on its
 * console, and a second run tells that apart from a hang of dvmm's own, which times out again (the test
 * then sees that run as it ended).
 */
export async function runInLab(
  command: string,
  opts: { smp?: number; mem?: number; add?: string[]; timeout?: number } = {},
): Promise<LabResult> {
  let timeouts = 0;
  for (let attempt = 1;; attempt++) {
    try {
      return await runInLabOnce(command, withinBudget(opts));
    } catch (e) {
      if (!(e instanceof LabFault)) throw e;
      if (e.run && ++timeouts > 1) return e.run; // a second timeout is dvmm's own
      if (attempt >= 4) throw e;
      if (labSecondsLeft() < 2 * MIN_RUN) {
        if (e.run) return e.run;
        throw new Error(
          `${e.message.split("\n")[0]}; no time left in the suite's lab budget to run it again`,
        );
      }
      const reason = e.message.match(/^LAB (FAULT|TIMEOUT): .*$/m)?.[0] ?? "LAB FAULT";
      console.error(
        `${reason}\nlab fault, running the lab command once more; console tail:\n${e.message.slice(-3000)}`,
      );
    }
  }
}

/**
 * The suite's lab budget. tests/run exports DVMM_SUITE_START (epoch seconds); lab runs end by
 * DVMM_LAB_MINUTES (default 75) after it, so that one stalling lab cannot push `make test` past CI's
 * 90 minutes: a run's timeout is cut to what is left, a fault is retried only when there is time, and a
 * run that would start with less than MIN_RUN seconds left fails at once, saying so.
 */
const MIN_RUN = 90;

function labSecondsLeft(): number {
  const start = Number(Deno.env.get("DVMM_SUITE_START") ?? NaN);
  if (!Number.isFinite(start)) return Infinity;
  const minutes = Number(Deno.env.get("DVMM_LAB_MINUTES") ?? 75);
  return start + minutes * 60 - Date.now() / 1000;
}

function withinBudget<T extends { timeout?: number }>(opts: T): T {
  const left = Math.floor(labSecondsLeft());
  if (left < MIN_RUN) {
    throw new Error(
      `the suite's lab budget (DVMM_LAB_MINUTES) is spent (${left} s left): lab run not started`,
    );
  }
  return { ...opts, timeout: Math.min(opts.timeout ?? 900, left - 30) };
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

/**
 * Shell functions for the host scripts of lab tests, so that a VMM that died or hangs ends the script
 * at once with what happened, instead of the lab's timeout:
 * - `waitfor FILE PATTERN TRIES [PID]`: polls every 0.5 s until FILE holds PATTERN; gives up after
 *   TRIES polls, or as soon as process PID has gone; its status says whether PATTERN came.
 * - `reap PID NAME SECS`: waits up to SECS for process PID (a VMM told to shut down) and prints
 *   `NAME-exit STATUS`; one still running then is reported (`HUNG NAME`, with its threads) and killed.
 */
export const SH_LIB = String.raw`
waitfor() {
  i=0
  while ! grep -q "$2" "$1" 2>/dev/null && [ $i -lt $3 ]; do
    if [ $# -ge 4 ] && ! kill -0 $4 2>/dev/null; then echo "GONE: process $4 ended before $1 showed '$2'"; break; fi
    sleep 0.5; i=$((i+1))
  done
  grep -q "$2" "$1"
}
reap() {
  i=0
  while kill -0 $1 2>/dev/null && [ $i -lt $(($3 * 2)) ]; do sleep 0.5; i=$((i+1)); done
  if kill -0 $1 2>/dev/null; then
    echo "HUNG $2: still running $3 s after its shutdown; threads: $(cat /proc/$1/task/*/comm 2>/dev/null | sort | uniq -c | tr -s ' \n' ' ')"
    kill -9 $1
  fi
  wait $1; echo "$2-exit $?"
}
`;

/**
 * For assertion messages: `tail(n)` is what went wrong (see {@link labTrouble}) followed by the last `n`
 * characters of the run's output (`out`: stdout, cleaned by the test as it likes) and its stderr.
 */
export function labTail(res: LabResult, out = res.stdout): (n: number) => string {
  const all = out + "\n--- stderr ---\n" + res.stderr;
  const trouble = labTrouble(res);
  return (n) => (trouble ? `${trouble}\n` : "") + all.slice(-n);
}
