/** The real `main.ts` as a subprocess: option errors, the API lifetime, the socket file, events. */
import assert from "node:assert/strict";

const MAIN = new URL("../main.ts", import.meta.url).pathname;
const dec = new TextDecoder();

function dvmm(args: string[], opts: { stdin?: "null" | "piped" } = {}) {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", "--quiet", "--no-prompt", MAIN, ...args],
    stdin: opts.stdin ?? "null",
    stdout: "piped",
    stderr: "piped",
  });
}

async function run(args: string[]) {
  const out = await dvmm(args).output();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

async function waitFor(path: string, ms = 20000): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    try {
      if ((await Deno.lstat(path)).isSocket) return;
    } catch { /* not yet */ }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${path} did not appear`);
}

Deno.test("cli: --version and --help", async () => {
  const v = await run(["--version"]);
  assert.equal(v.code, 0);
  assert.match(v.stdout, /^dvmm v\d+\.\d+\.\d+/);
  const h = await run(["--help"]);
  assert.equal(h.code, 0);
  assert.match(h.stdout, /--api-socket/);
});

Deno.test("cli: bad options exit non-zero with a message naming the option", async () => {
  const cases: [string[], RegExp][] = [
    [["--bogus"], /Unknown option '--bogus'/],
    [["--kernel", "/k", "--cpus", "boot=4,max=2"], /--cpus: .*must not exceed max_vcpus/],
    [["--kernel", "/k", "--memory", "size=lots"], /--memory: size: 'lots' is not a size/],
    [["--kernel", "/k", "--disk", "path=/a,colour=red"], /--disk: unknown parameter 'colour'/],
    [["--kernel", "/k", "--net", "tap=tap0,mac=nope"], /--net: net\.0\.mac/],
    [["--kernel", "/k", "--serial", "loud"], /--serial: expected/],
    [["--cpus", "boot=2"], /--kernel \(or --firmware\) is required/],
    [[], /nothing to do/],
    [["--api-socket", "fd=x"], /--api-socket: fd must be a file descriptor number/],
    [["--api-socket", "fd=97"], /--api-socket fd=97: not an open, listening socket/],
    [["--api-socket", "/tmp/x.sock", "extra"], /unexpected argument 'extra'/],
  ];
  for (const [args, re] of cases) {
    const r = await run(args);
    assert.notEqual(r.code, 0, `${args.join(" ")} should fail`);
    assert.match(r.stderr, re, `${args.join(" ")}: ${r.stderr}`);
  }
});

Deno.test("cli: a VM that cannot boot makes dvmm exit non-zero", async () => {
  const r = await run(["--kernel", "/nonexistent/vmlinux", "--serial", "null", "--console", "off"]);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /cannot boot the VM/);
});

Deno.test("cli: API-only dvmm serves until vmm.shutdown, then exits 0 and removes its socket", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-cli-" });
  const sock = `${dir}/api.sock`;
  const eventsFile = `${dir}/events.json`;
  const child = dvmm(["--api-socket", `path=${sock}`, "--event-monitor", `path=${eventsFile}`]).spawn();
  try {
    await waitFor(sock);
    assert.equal((await Deno.stat(sock)).mode! & 0o777, 0o600);

    // A second dvmm on the same live socket is refused.
    const second = await run(["--api-socket", `path=${sock}`]);
    assert.equal(second.code, 1);
    assert.match(second.stderr, /in use by another process/);

    const remote = (args: string[]) => run(["remote", "--api-socket", sock, ...args]);
    const ping = await remote(["ping"]);
    assert.equal(ping.code, 0, ping.stderr);
    assert.equal(JSON.parse(ping.stdout).pid, child.pid);

    const boot = await remote(["boot"]);
    assert.equal(boot.code, 1);
    assert.match(boot.stderr, /vm\.boot failed \(HTTP 404\): the VM is not created/);

    const bye = await remote(["shutdown-vmm"]);
    assert.equal(bye.code, 0, bye.stderr);
    const status = await child.status;
    assert.equal(status.code, 0);
    await assert.rejects(() => Deno.lstat(sock), Deno.errors.NotFound);

    const lines = (await Deno.readTextFile(eventsFile)).trim().split("\n").map((l) => JSON.parse(l));
    assert.deepEqual(lines.map((e) => `${e.source}:${e.event}`), ["vmm:starting", "vmm:shutdown"]);
    for (const e of lines) {
      assert.ok(Number.isInteger(e.timestamp.secs) && Number.isInteger(e.timestamp.nanos));
      assert.equal(e.properties, null);
    }
  } finally {
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
    await child.output().catch(() => {});
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("cli: SIGTERM shuts dvmm down cleanly", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-cli-" });
  const sock = `${dir}/api.sock`;
  const child = dvmm(["--api-socket", `path=${sock}`]).spawn();
  try {
    await waitFor(sock);
    child.kill("SIGTERM");
    const out = await child.output();
    assert.equal(out.code, 0, dec.decode(out.stderr));
    await assert.rejects(() => Deno.lstat(sock), Deno.errors.NotFound);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
