/**
 * The REST API driving a real guest in the KVM lab, over the UNIX socket with curl:
 * ping → create → boot → info → pause/resume → counters → shutdown → delete → create again →
 * vmm.shutdown, with the status codes of the API document (tests/lab/api_checks.sh).
 */
import assert from "node:assert/strict";
import { labCases, labUnavailable, runInLab } from "./helpers/lab.ts";

const why = labUnavailable();

interface Exchange {
  method: string;
  endpoint: string;
  status: number;
  body: string;
}

function exchanges(output: string): Exchange[] {
  const out: Exchange[] = [];
  for (const line of output.split("\n")) {
    const m = line.match(/^HTTP (\S+) (\S+) (\d+)$/);
    if (m) out.push({ method: m[1], endpoint: m[2], status: Number(m[3]), body: "" });
    else if (out.length && line.startsWith("{")) out[out.length - 1].body = line;
  }
  return out;
}

Deno.test({ name: "lab: the REST API drives real guests", ignore: why !== null }, async (t) => {
  const res = await runInLab("sh /dvmm/tests/lab/api_checks.sh; bash /dvmm/tests/lab/seed_curl.sh", {
    timeout: 300,
  });
  await t.step("create, boot, pause, resume, counters, shutdown, delete, create again", () => {
    checkApiCase(res.stdout, res.stderr);
  });
  await t.step("vm.power-button reaches the guest's ACPI power button as KEY_POWER", () => {
    const c = labCases(res.stdout).get("power-button");
    assert.ok(c, `power-button case did not complete:\n${res.stdout.slice(-5000)}`);
    const context = `\n--- lab output ---\n${c.output.slice(-3000)}`;
    assert.match(c.output, /^power-button HTTP 204$/m, context);
    assert.match(c.output, /^pb-device event\d+$/m, `the guest has a Power Button input device${context}`);
    // struct input_event after its 16-byte timestamp: type EV_KEY (1), code KEY_POWER (0x74), value 1.
    assert.match(c.output, /^01 00 74 00 01 00 00 00 /m, `KEY_POWER press${context}`);
    assert.match(
      c.output,
      /^\s*\d+:\s+[1-9]\d*\s+IO-APIC\s+5-edge\s+ACPI:Ged$/m,
      `GED interrupt counted${context}`,
    );
    assert.equal(c.exit, 0, context);
  });
  await t.step("the API document's curl examples, verbatim, against a real VM", () => {
    const c = labCases(res.stdout).get("seed");
    assert.ok(c, `seed case did not complete:\n${res.stdout.slice(-5000)}\n${res.stderr.slice(-3000)}`);
    const status = new Map([...c.output.matchAll(/^STATUS (\S+) (\d+)$/gm)].map((m) => [m[1], Number(m[2])]));
    const context = `\n--- lab output ---\n${c.output.slice(-5000)}`;
    assert.deepEqual(
      Object.fromEntries(status),
      { create: 204, boot: 204, info: 200, reboot: 204, shutdown: 204 },
      context,
    );
    const info = JSON.parse(c.output.match(/^\{"config".*$/m)?.[0] ?? "{}");
    assert.equal(info.state, "Running", context);
    assert.equal(info.config?.cpus?.boot_vcpus, 4, context);
    assert.match(c.output, /^TAP vmtap\d+ /m, `dvmm created a tap with the host address${context}`);
    assert.equal(c.exit, 0, context);
  });
});

function checkApiCase(stdout: string, stderr: string): void {
  const res = { stdout, stderr };
  const c = labCases(res.stdout).get("api");
  assert.ok(c, `api case did not complete:\n${res.stdout.slice(-5000)}\n${res.stderr.slice(-3000)}`);
  const ex = exchanges(c.output);
  const context = `\n--- lab output ---\n${c.output.slice(-6000)}`;
  const expect: [string, string, number, string?][] = [
    ["GET", "vmm.ping", 200],
    ["GET", "vm.info", 404],
    ["PUT", "vm.create", 204],
    ["PUT", "vm.create", 405], // a VM exists already
    ["GET", "vm.info", 200, "Created"],
    ["PUT", "vm.boot", 204],
    ["GET", "vm.info", 200, "Running"],
    ["PUT", "vm.pause", 204],
    ["GET", "vm.info", 200, "Paused"],
    ["PUT", "vm.pause", 405], // already paused
    ["PUT", "vm.resume", 204],
    ["GET", "vm.counters", 200],
    ["PUT", "vm.shutdown", 204],
    ["GET", "vm.info", 200, "Shutdown"],
    ["PUT", "vm.delete", 204],
    ["GET", "vm.info", 404],
    ["PUT", "vm.create", 204],
    ["GET", "vm.info", 200, "Created"],
    ["PUT", "vmm.shutdown", 204],
  ];
  assert.equal(ex.length, expect.length, `requests made: ${ex.map((e) => e.endpoint).join(", ")}${context}`);
  expect.forEach(([method, endpoint, status, state], i) => {
    const e = ex[i];
    assert.equal(
      `${e.method} ${e.endpoint} ${e.status}`,
      `${method} ${endpoint} ${status}`,
      `request ${i}${context}`,
    );
    if (state) assert.equal(JSON.parse(e.body).state, state, `vm.info state at request ${i}${context}`);
  });
  const ping = JSON.parse(ex[0].body);
  assert.ok(typeof ping.version === "string" && typeof ping.pid === "number", ex[0].body);
  const info = JSON.parse(ex[6].body);
  assert.equal(info.config.cpus.boot_vcpus, 2);
  assert.equal(info.config.memory.size, 268435456);
  assert.match(c.output, /^srw-------/m, "socket mode 0600");
  assert.match(c.output, /^guest is running$/m, "the guest ran its script");
  assert.match(c.output, /^socket removed$/m);
  assert.equal(c.exit, 0, `vmm.shutdown makes dvmm exit 0${context}`);
}
