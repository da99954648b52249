/**
 * Every endpoint, driven by a client that reads answers exactly as Cloud Hypervisor's ch-remote does
 * (tests/helpers/ch_wire.ts), over one kept-alive connection, plus the exact bytes of the framing.
 */
import assert from "node:assert/strict";
import { EXAMPLE_VM, startTestServer } from "../api/testing.ts";
import { ChConnection, chParse } from "./helpers/ch_wire.ts";
import { ROUTES } from "../api/routes.ts";

type Step = [method: "GET" | "PUT", endpoint: string, body: unknown, status: number];

/** In order: each endpoint in the states where clients use it, with the document's status codes. */
const STEPS: Step[] = [
  ["GET", "vmm.ping", undefined, 200],
  ["GET", "vm.info", undefined, 404],
  ["GET", "vm.counters", undefined, 404],
  ["PUT", "vm.boot", undefined, 404],
  ["PUT", "vm.create", EXAMPLE_VM, 204],
  ["GET", "vm.info", undefined, 200],
  ["PUT", "vm.add-disk", { path: "/tmp/extra.img", id: "extra" }, 204],
  ["PUT", "vm.remove-device", { id: "extra" }, 204],
  ["PUT", "vm.remove-device", { id: "ghost" }, 404],
  ["PUT", "vm.resize", { desired_vcpus: 2, desired_ram: null, desired_balloon: null }, 204],
  ["PUT", "vm.resize-zone", { id: "z", desired_ram: 4096 }, 404],
  ["PUT", "vm.resize-disk", { id: "nope", desired_size: 4096 }, 404],
  ["PUT", "vm.add-fs", { tag: "t", socket: "/tmp/fs.sock" }, 400],
  ["PUT", "vm.add-pmem", { file: "/tmp/p.img" }, 204],
  ["PUT", "vm.add-vsock", { cid: 3, socket: "/tmp/v.sock" }, 204],
  ["PUT", "vm.add-device", { path: "/sys/bus/pci/devices/0000:00:01.0" }, 204],
  // vfio-user needs shared memory, as in Cloud Hypervisor.
  ["PUT", "vm.add-user-device", { socket: "/tmp/user.sock" }, 400],
  ["PUT", "vm.add-vdpa", { path: "/dev/vhost-vdpa-0" }, 204],
  ["PUT", "vm.add-generic-vhost-user", { socket: "/tmp/g.sock", queue_sizes: [128], device_type: 26 }, 400],
  ["PUT", "vm.add-net", { tap: "dvmmt0" }, 204],
  ["PUT", "vm.restore", { source_url: "file:///tmp/s" }, 404],
  ["PUT", "vm.receive-migration", { receiver_url: "unix:/tmp/m" }, 405],
  ["PUT", "vm.boot", undefined, 204],
  ["GET", "vm.counters", undefined, 200],
  ["PUT", "vm.pause", undefined, 204],
  ["PUT", "vm.snapshot", { destination_url: "file:///tmp/s" }, 500],
  ["PUT", "vm.coredump", { destination_url: "file:///tmp/c" }, 500],
  ["PUT", "vm.resume", undefined, 204],
  ["PUT", "vm.send-migration", { destination_url: "unix:/tmp/m" }, 500],
  ["PUT", "vm.power-button", undefined, 204],
  ["PUT", "vm.nmi", undefined, 204],
  ["PUT", "vm.reboot", undefined, 204],
  ["PUT", "vm.shutdown", undefined, 204],
  ["PUT", "vm.delete", undefined, 204],
  ["PUT", "vmm.shutdown", undefined, 204],
];

Deno.test("ch-remote's parser: every endpoint answers with the expected code and body", async () => {
  const t = await startTestServer();
  const conn = await ChConnection.open(t.socket);
  try {
    const seen = new Set<string>();
    for (const [method, endpoint, body, status] of STEPS) {
      seen.add(endpoint);
      const what = `${method} ${endpoint}`;
      const r = await conn.request(method, endpoint, body === undefined ? undefined : JSON.stringify(body));
      assert.equal(r.status, status, `${what}: ${r.body}`);
      assert.ok(r.body !== null, `${what}: every response carries Content-Length`);
      if (status === 204) assert.equal(r.body, "", what);
      else if (status === 200) assert.equal(typeof JSON.parse(r.body), "object", what);
      else {
        const msgs = JSON.parse(r.body);
        assert.ok(Array.isArray(msgs) && msgs.every((m) => typeof m === "string"), `${what}: ${r.body}`);
      }
    }
    assert.deepEqual([...seen].sort(), Object.keys(ROUTES).sort(), "the walk covers every endpoint");
    assert.equal(await t.loop.exited, 0);
  } finally {
    conn.close();
    await t.close();
  }
});

Deno.test("the framing is Cloud Hypervisor's, byte for byte", async () => {
  const t = await startTestServer();
  try {
    const raw = async (req: string) => {
      const c = await Deno.connect({ transport: "unix", path: t.socket });
      await c.write(new TextEncoder().encode(req));
      const buf = new Uint8Array(65536);
      let text = "";
      while (!chParse(text)) {
        const n = await c.read(buf);
        if (n === null) break;
        text += new TextDecoder().decode(buf.subarray(0, n));
      }
      c.close();
      return text;
    };
    const ping = await raw("GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n");
    const body = ping.slice(ping.indexOf("\r\n\r\n") + 4);
    assert.equal(
      ping.slice(0, ping.indexOf("\r\n\r\n") + 4),
      "HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n" +
        `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n`,
    );
    assert.equal(JSON.parse(body).pid, Deno.pid);
    assert.equal(
      await raw("PUT /api/v1/vm.delete HTTP/1.1\r\nHost: localhost\r\n\r\n"),
      "HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
    );
    const err = await raw("PUT /api/v1/vm.boot HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    assert.match(
      err,
      /^HTTP\/1\.1 404 \r\nServer: Cloud Hypervisor API\r\nConnection: close\r\nContent-Type: application\/json\r\nContent-Length: \d+\r\n\r\n\["the VM is not created"\]$/,
    );
    const wrong = await raw("GET /api/v1/vm.boot HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert.match(wrong, /^HTTP\/1\.1 405 \r\n/);
    assert.match(wrong, /\r\nAllow: PUT\r\n/);
  } finally {
    await t.close();
  }
});

Deno.test("keep-alive: pipelined requests on one connection are answered in order", async () => {
  const t = await startTestServer();
  try {
    const c = await Deno.connect({ transport: "unix", path: t.socket });
    const create = JSON.stringify(EXAMPLE_VM);
    await c.write(new TextEncoder().encode(
      "GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n" +
        `PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nContent-Length: ${create.length}\r\n\r\n${create}` +
        "GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ));
    let text = "";
    const statuses: number[] = [];
    const buf = new Uint8Array(65536);
    while (statuses.length < 3) {
      const p = chParse(text);
      if (p) {
        statuses.push(p.reply.status);
        text = p.rest;
        continue;
      }
      const n = await c.read(buf);
      if (n === null) break;
      text += new TextDecoder().decode(buf.subarray(0, n));
    }
    c.close();
    assert.deepEqual(statuses, [200, 204, 200]);
  } finally {
    await t.close();
  }
});
