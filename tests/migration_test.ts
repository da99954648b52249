/**
 * Live migration between two VMs on this machine's /dev/kvm: a guest that dirties 256 pages as fast as it
 * can is migrated over a UNIX socket while it runs; at the switch-over the destination's memory is the
 * source's, byte for byte (the dirty tracking missed nothing), and the guest counts on there. A migration
 * that cannot reach its destination, or whose destination refuses the VM, leaves the source running.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { VmConfigSchema } from "../vmm/vm_config.ts";
import { Vm } from "../vmm/vm.ts";
import { parseMigrationUrl, receiveMigration, sendMigration } from "../vmm/migration.ts";
import { SendMigrationDataSchema } from "../vmm/vm_config.ts";
import { dirtyingGuest, guestCounter, pvhElf } from "./helpers/tiny_guest.ts";
import { kvmAvailable } from "./helpers/realmode.ts";
import { until, waitForSocket } from "./helpers/host.ts";

const ignore = !kvmAvailable();

Deno.test("migration URLs: unix:PATH and tcp:HOST:PORT", () => {
  assert.deepEqual(parseMigrationUrl("unix:/tmp/m.sock", "x"), {
    kind: "unix",
    path: "/tmp/m.sock",
    text: "unix:/tmp/m.sock",
  });
  assert.deepEqual(parseMigrationUrl("tcp:127.0.0.1:6000", "x"), {
    kind: "tcp",
    host: "127.0.0.1",
    port: 6000,
    text: "tcp:127.0.0.1:6000",
  });
  assert.equal((parseMigrationUrl("tcp:[::1]:7", "x") as { host: string }).host, "::1");
  assert.equal((parseMigrationUrl("tcp:0.0.0.0:6000", "x") as { host: string }).host, "0.0.0.0");
  assert.throws(() => parseMigrationUrl("tcp:host:99999", "destination_url"), /port 99999 is out of range/);
  assert.throws(() => parseMigrationUrl("file:///x", "destination_url"), /use unix:PATH or tcp:HOST:PORT/);
  assert.throws(() => parseMigrationUrl("unix:", "receiver_url"), /names no socket path/);
});

async function setUp() {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-mig-" });
  await Deno.writeFile(`${dir}/guest.elf`, pvhElf(dirtyingGuest()));
  const config = VmConfigSchema.parse({
    memory: { size: 128 << 20 },
    payload: { kernel: `${dir}/guest.elf` },
    serial: { mode: "Null" },
    console: { mode: "Null" },
  });
  const a = new Vm(config);
  await a.boot();
  await until("the guest to count", () => guestCounter(a) > 100_000);
  return { dir, config, a };
}

Deno.test({
  name: "live migration over a UNIX socket: memory identical at the switch-over, the guest runs on",
  ignore,
}, async () => {
  const { dir, config, a } = await setUp();
  let b: Vm | null = null;
  try {
    const url = `unix:${dir}/mig.sock`;
    const received = receiveMigration(parseMigrationUrl(url, "receiver_url"));
    assert.ok(await waitForSocket(`${dir}/mig.sock`), "the receiver listens");
    const sent = sendMigration(
      a,
      config,
      SendMigrationDataSchema.parse({ destination_url: url, downtime_ms: 50, timeout_strategy: "Ignore" }),
    );
    const got = await received;
    b = new Vm(structuredClone(config));
    await b.boot({ state: got.state, memoryFd: got.memfd, onDemand: true, prefault: false });
    // The source is paused now: every byte of its RAM must have arrived.
    const at = guestCounter(a);
    assert.equal(guestCounter(b), at, "the counter at the switch-over");
    a.memory!.regions.forEach((r, i) => {
      const other = b!.memory!.regions[i].bytes;
      assert.equal(other.length, r.bytes.length);
      assert.ok(
        Buffer.compare(r.bytes, other) === 0,
        `RAM region ${i} (gpa 0x${r.gpa.toString(16)}) differs`,
      );
    });
    await got.answer(true);
    const stats = await sent;
    assert.ok(stats.rounds >= 1, `pre-copy ran ${stats.rounds} round(s)`);
    console.log(`  ${JSON.stringify(stats)}`);
    await b.resume();
    await until("the destination guest to count on", () => guestCounter(b!) > at + 100_000);
    assert.equal(guestCounter(a), at, "the source stays paused");
  } finally {
    await a.shutdown();
    await b?.shutdown();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name: "a migration that fails leaves the source running: no receiver; a receiver that refuses",
  ignore,
}, async () => {
  const { dir, config, a } = await setUp();
  try {
    const opts = (u: string) => SendMigrationDataSchema.parse({ destination_url: u });
    await assert.rejects(sendMigration(a, config, opts(`unix:${dir}/nobody.sock`)), /connecting to unix:/);
    let c = guestCounter(a);
    await until("the source to run on", () => guestCounter(a) > c + 10_000);
    const url = `unix:${dir}/refuse.sock`;
    const received = receiveMigration(parseMigrationUrl(url, "receiver_url"));
    assert.ok(await waitForSocket(`${dir}/refuse.sock`), "the receiver listens");
    const sent = sendMigration(a, config, opts(url));
    const got = await received;
    await got.answer(false, "no room here");
    await assert.rejects(sent, /the receiver could not start the VM: no room here/);
    c = guestCounter(a);
    await until("the source to run on after the refusal", () => guestCounter(a) > c + 10_000);
  } finally {
    await a.shutdown();
    await Deno.remove(dir, { recursive: true });
  }
});
