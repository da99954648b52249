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
