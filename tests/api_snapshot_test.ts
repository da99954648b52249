/**
 * Snapshot, restore and coredump through the REST API of real dvmm processes, on this machine's
 * /dev/kvm: a counting guest is paused, dumped (the core shows its counter at the counter's guest
 * address) and snapshotted; the VMM exits; a second dvmm started with `--restore` comes up Paused with
 * the same counter, counts on once resumed, and every step shows on the event monitor. Wrong states get
 * the document's status codes.
 */
import assert from "node:assert/strict";
import { apiRequest } from "../api/client.ts";
import { COUNTER, countingGuest, pvhElf } from "./helpers/tiny_guest.ts";
import { kvmAvailable } from "./helpers/realmode.ts";
import { waitForSocket } from "./helpers/host.ts";

const MAIN = new URL("../main.ts", import.meta.url).pathname;

function dvmm(args: string[]): Deno.ChildProcess {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--quiet", MAIN, ...args],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
}

async function waitSocket(path: string): Promise<void> {
  for (let i = 0; i < 400; i++) {
    try {
      if ((await apiRequest(path, "GET", "/api/v1/vmm.ping")).status === 200) return;
    } catch { /* not yet */ }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`no API on ${path}`);
}

/** The counter as a core file holds it: at the PT_LOAD covering its guest-physical address. */
async function counterInCore(path: string): Promise<number> {
  const f = await Deno.readFile(path);
  const v = new DataView(f.buffer);
  const phnum = v.getUint16(56, true);
  for (let i = 0; i < phnum; i++) {
    const ph = 64 + 56 * i;
    if (v.getUint32(ph, true) !== 1) continue;
    const paddr = Number(v.getBigUint64(ph + 24, true));
    const size = Number(v.getBigUint64(ph + 32, true));
    if (COUNTER >= paddr && COUNTER < paddr + size) {
      return v.getUint32(Number(v.getBigUint64(ph + 8, true)) + COUNTER - paddr, true);
    }
  }
  throw new Error("no PT_LOAD holds the counter");
}

Deno.test({
  name: "api: pause, coredump, snapshot; a new dvmm --restore comes back Paused and counts on after resume",
  ignore: !kvmAvailable(),
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-api-snap-" });
  const put = (sock: string, ep: string, body?: unknown) => apiRequest(sock, "PUT", `/api/v1/${ep}`, body);
  const state = async (sock: string) =>
    JSON.parse((await apiRequest(sock, "GET", "/api/v1/vm.info")).body).state;
  await Deno.writeFile(`${dir}/count.elf`, pvhElf(countingGuest()));
  const a = dvmm([
    "--kernel",
    `${dir}/count.elf`,
    "--memory",
    "size=128M",
    "--cpus",
    "boot=2",
    "--console",
    "off",
    "--serial",
    `file=${dir}/a.out`,
    "--api-socket",
    `path=${dir}/a.sock`,
    "--event-monitor",
    `path=${dir}/a.events`,
  ]);
  let b: Deno.ChildProcess | null = null;
  try {
    await waitSocket(`${dir}/a.sock`);
    await new Promise((r) => setTimeout(r, 300));
    const sa = `${dir}/a.sock`;
    assert.equal(
      (await put(sa, "vm.snapshot", { destination_url: `file://${dir}/snap` })).status,
      405,
      "running",
    );
    assert.equal(
      (await put(sa, "vm.coredump", { destination_url: `file://${dir}/core` })).status,
      405,
      "running",
    );
    assert.equal((await put(sa, "vm.pause")).status, 204);
    const bad = await put(sa, "vm.snapshot", { destination_url: "tcp:127.0.0.1:4444" });
    assert.equal(bad.status, 400, bad.body);
    assert.equal((await put(sa, "vm.coredump", { destination_url: `file://${dir}/core.a` })).status, 204);
    const before = await counterInCore(`${dir}/core.a`);
    assert.ok(before > 0, `the guest counted (${before})`);
    const snap = await put(sa, "vm.snapshot", { destination_url: `file://${dir}/snap` });
    assert.equal(snap.status, 204, snap.body);
    for (const f of ["config.json", "state.json", "memory"]) await Deno.stat(`${dir}/snap/${f}`);
    assert.equal(
      (await put(sa, "vm.restore", { source_url: `file://${dir}/snap` })).status,
      404,
      "VM exists",
    );
    assert.equal((await put(sa, "vmm.shutdown")).status, 204);
    assert.equal((await a.status).code, 0);
    const eventsA = await Deno.readTextFile(`${dir}/a.events`);
    assert.match(eventsA, /"event":"snapshotting"[\s\S]*"event":"snapshotted"/);

    b = dvmm([
      "--api-socket",
      `path=${dir}/b.sock`,
      "--restore",
      `source_url=file://${dir}/snap`,
      "--event-monitor",
      `path=${dir}/b.events`,
    ]);
    const sb = `${dir}/b.sock`;
    await waitSocket(sb);
    // vm.info answers while the restore is under way (state Created); it ends Paused.
    for (let i = 0; i < 400; i++) {
      const r = await apiRequest(sb, "GET", "/api/v1/vm.info");
      if (r.status === 200 && JSON.parse(r.body).state !== "Created") break;
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(await state(sb), "Paused");
    assert.equal((await put(sb, "vm.coredump", { destination_url: `file://${dir}/core.b` })).status, 204);
    assert.equal(await counterInCore(`${dir}/core.b`), before, "restored memory holds the saved counter");
    assert.equal((await put(sb, "vm.resume")).status, 204);
    await new Promise((r) => setTimeout(r, 500));
    assert.equal((await put(sb, "vm.pause")).status, 204);
    assert.equal((await put(sb, "vm.coredump", { destination_url: `file://${dir}/core.c` })).status, 204);
    const after = await counterInCore(`${dir}/core.c`);
    assert.ok(after > before, `the restored guest counts on (${before} → ${after})`);
    assert.equal((await put(sb, "vmm.shutdown")).status, 204);
    assert.equal((await b.status).code, 0);
    const eventsB = await Deno.readTextFile(`${dir}/b.events`);
    assert.match(eventsB, /"event":"restoring"[\s\S]*"event":"restored"/);
  } finally {
    for (const p of [a, b]) {
      try {
        p?.kill("SIGKILL");
      } catch { /* exited */ }
      await p?.stdout.cancel().catch(() => {});
      await p?.stderr.cancel().catch(() => {});
    }
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name:
    "api: send-migration to a second dvmm over unix: the source exits 0, the destination runs the guest on",
  ignore: !kvmAvailable(),
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-api-mig-" });
  const put = (sock: string, ep: string, body?: unknown) => apiRequest(sock, "PUT", `/api/v1/${ep}`, body);
  await Deno.writeFile(`${dir}/count.elf`, pvhElf(countingGuest()));
  const a = dvmm([
    "--kernel",
    `${dir}/count.elf`,
    "--memory",
    "size=128M",
    "--console",
    "off",
    "--serial",
    "null",
    "--api-socket",
    `path=${dir}/a.sock`,
    "--event-monitor",
    `path=${dir}/a.ev`,
  ]);
  const b = dvmm(["--api-socket", `path=${dir}/b.sock`, "--event-monitor", `path=${dir}/b.ev`]);
  try {
    await waitSocket(`${dir}/a.sock`);
    await waitSocket(`${dir}/b.sock`);
    const receiving = put(`${dir}/b.sock`, "vm.receive-migration", { receiver_url: `unix:${dir}/mig.sock` });
    assert.ok(await waitForSocket(`${dir}/mig.sock`), "the receiver listens");
    const sent = await put(`${dir}/a.sock`, "vm.send-migration", { destination_url: `unix:${dir}/mig.sock` });
    assert.equal(sent.status, 204, sent.body);
    assert.equal((await receiving).status, 204);
    assert.equal((await a.status).code, 0, "the source VMM exits after the hand-over");
    assert.match(
      await Deno.readTextFile(`${dir}/a.ev`),
      /"migration-started"[\s\S]*"migration-memory-iteration"[\s\S]*"migration-finished".*"downtime_ms":"\d+"/,
    );
    assert.match(
      await Deno.readTextFile(`${dir}/b.ev`),
      /"migration-receive-ready"[\s\S]*"migration-receive-started"[\s\S]*"migration-receive-finished"/,
    );
    const info = JSON.parse((await apiRequest(`${dir}/b.sock`, "GET", "/api/v1/vm.info")).body);
    assert.equal(info.state, "Running");
    assert.equal((await put(`${dir}/b.sock`, "vm.pause")).status, 204);
    assert.equal(
      (await put(`${dir}/b.sock`, "vm.coredump", { destination_url: `file://${dir}/core.1` })).status,
      204,
    );
    assert.equal((await put(`${dir}/b.sock`, "vm.resume")).status, 204);
    await new Promise((r) => setTimeout(r, 300));
    assert.equal((await put(`${dir}/b.sock`, "vm.pause")).status, 204);
    assert.equal(
      (await put(`${dir}/b.sock`, "vm.coredump", { destination_url: `file://${dir}/core.2` })).status,
      204,
    );
    const c1 = await counterInCore(`${dir}/core.1`);
    const c2 = await counterInCore(`${dir}/core.2`);
    assert.ok(c1 > 0 && c2 > c1, `the guest counts at the destination (${c1} → ${c2})`);
    assert.equal((await put(`${dir}/b.sock`, "vmm.shutdown")).status, 204);
    assert.equal((await b.status).code, 0);
  } finally {
    for (const p of [a, b]) {
      try {
        p.kill("SIGKILL");
      } catch { /* exited */ }
      await p.stdout.cancel().catch(() => {});
      await p.stderr.cancel().catch(() => {});
    }
    await Deno.remove(dir, { recursive: true });
  }
});
