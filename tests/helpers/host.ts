/** Small facts about the host the tests run on. */

/** The path of command `cmd` on PATH, or null. */
export function which(cmd: string): string | null {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    try {
      if (Deno.statSync(`${dir}/${cmd}`).isFile) return `${dir}/${cmd}`;
    } catch { /* not here */ }
  }
  return null;
}

/** Waits (bounded) until `path` is a listening UNIX socket; false when it did not appear. */
export async function waitForSocket(path: string, ms = 10_000): Promise<boolean> {
  const end = Date.now() + ms;
  for (;;) {
    try {
      if (Deno.statSync(path).isSocket) return true;
    } catch { /* not yet */ }
    if (Date.now() > end) return false;
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** Waits (bounded, polling every 20 ms) until `f` holds; throws naming `what` when it does not. */
export async function until(what: string, f: () => boolean | Promise<boolean>, ms = 20_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await f())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const MAIN = new URL("../../main.ts", import.meta.url).pathname;

/**
 * dvmm from its sources (`deno run main.ts ARGS`) as a subprocess: stdin closed, stdout and stderr piped,
 * Deno's update check off (a VMM makes no network calls; under seccomp the check's calls are foreign).
 * `denoFlags` go to `deno run` (e.g. `--v8-flags=...`).
 */
export function dvmmCommand(args: string[], denoFlags: string[] = []): Deno.Command {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", "--quiet", "--no-prompt", ...denoFlags, MAIN, ...args],
    env: { DENO_NO_UPDATE_CHECK: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  });
}

/**
 * The names of this process's threads, without the Deno runtime's own blocking-pool threads
 * ("tokio-runtime-w"), which come and go with its file operations (they end after ten idle seconds):
 * what stays is the main thread, V8's and every worker's (vCPUs `vcpuN`, devices after their ids).
 */
export function threadNames(): string[] {
  const names: string[] = [];
  for (const t of Deno.readDirSync("/proc/self/task")) {
    try {
      const name = Deno.readTextFileSync(`/proc/self/task/${t.name}/comm`).trim();
      if (name !== "tokio-runtime-w") names.push(name);
    } catch { /* the thread ended while listed */ }
  }
  return names.sort();
}

/** This process's open descriptors, each with what it refers to (`readlink /proc/self/fd/N`). */
export function openFds(): Map<number, string> {
  const fds = new Map<number, string>();
  for (const e of Deno.readDirSync("/proc/self/fd")) {
    try {
      fds.set(Number(e.name), Deno.readLinkSync(`/proc/self/fd/${e.name}`));
    } catch { /* closed while listed (the directory's own descriptor among them) */ }
  }
  return fds;
}

/**
 * What differs between two `openFds()` listings, by kind and count ("" when nothing does): descriptors
 * are compared by what they refer to, with socket and pipe inode numbers dropped, so a descriptor
 * closed and opened again under another number is no difference, and one more eventfd is.
 */
export function fdDiff(before: Map<number, string>, after: Map<number, string>): string {
  const kinds = (m: Map<number, string>) => {
    const n = new Map<string, number>();
    for (const what of m.values()) {
      const k = what.replace(/^(socket|pipe):\[\d+\]$/, "$1");
      n.set(k, (n.get(k) ?? 0) + 1);
    }
    return n;
  };
  const a = kinds(before);
  const b = kinds(after);
  const out: string[] = [];
  for (const k of new Set([...a.keys(), ...b.keys()])) {
    const d = (b.get(k) ?? 0) - (a.get(k) ?? 0);
    if (d !== 0) out.push(`${d > 0 ? "+" : ""}${d} ${k}`);
  }
  return out.join(", ");
}
