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
 */
export function dvmmCommand(args: string[]): Deno.Command {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", "--quiet", "--no-prompt", MAIN, ...args],
    env: { DENO_NO_UPDATE_CHECK: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  });
}
