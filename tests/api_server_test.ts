import assert from "node:assert/strict";
import { apiRequest, errorMessages, exchange, parseResponse } from "../api/client.ts";
import { startApiServer } from "../api/server.ts";
import { ControlLoop } from "../vmm/control.ts";
import { EXAMPLE_VM, fakeFactory, startTestServer } from "../api/testing.ts";

const V1 = "/api/v1/";
const get = (s: string, ep: string) => apiRequest(s, "GET", V1 + ep);
const put = (s: string, ep: string, body?: unknown) => apiRequest(s, "PUT", V1 + ep, body);

function assertError(
  r: { status: number; body: string; headers: Headers },
  status: number,
  pattern?: RegExp,
) {
  assert.equal(r.status, status, `expected ${status}, got ${r.status}: ${r.body}`);
  assert.equal(r.headers.get("content-type"), "application/json");
  const msgs = JSON.parse(r.body);
  assert.ok(Array.isArray(msgs) && msgs.length > 0 && msgs.every((m: unknown) => typeof m === "string"));
  if (pattern) assert.match(msgs.join("\n"), pattern);
}

Deno.test("api: ping, unknown paths and wrong methods", async () => {
  const t = await startTestServer();
  try {
    const ping = await get(t.socket, "vmm.ping");
    assert.equal(ping.status, 200);
    assert.equal(ping.headers.get("content-type"), "application/json");
    const body = JSON.parse(ping.body);
    assert.equal(body.pid, Deno.pid);
    assert.equal(typeof body.version, "string");

    assertError(await get(t.socket, "vm.nope"), 404, /unknown endpoint/);
    assertError(await apiRequest(t.socket, "GET", "/api/v2/vmm.ping"), 404);
    assertError(await apiRequest(t.socket, "GET", "/"), 404);
    const wrong = await put(t.socket, "vmm.ping");
    assertError(wrong, 405, /expects GET/);
    assert.equal(wrong.headers.get("allow"), "GET");
    assertError(await get(t.socket, "vm.boot"), 405);
    assertError(await apiRequest(t.socket, "POST", V1 + "vm.create", EXAMPLE_VM), 405);
    assertError(await apiRequest(t.socket, "DELETE", V1 + "vm.delete"), 405);
  } finally {
    await t.close();
  }
});

Deno.test("api: without a VM, VM actions answer 404 and delete answers 204", async () => {
  const t = await startTestServer();
  try {
    for (
      const ep of [
        "vm.boot",
        "vm.pause",
        "vm.resume",
        "vm.shutdown",
        "vm.reboot",
        "vm.power-button",
        "vm.nmi",
      ]
    ) {
      assertError(await put(t.socket, ep), 404, /not created/);
    }
    assertError(await get(t.socket, "vm.info"), 404, /not created/);
    assertError(await get(t.socket, "vm.counters"), 404);
    assertError(await put(t.socket, "vm.add-disk", { path: "/x" }), 404);
    assertError(await put(t.socket, "vm.remove-device", { id: "x" }), 404);
    assertError(await put(t.socket, "vm.resize", { desired_vcpus: 2 }), 404);
    assertError(await put(t.socket, "vm.resize-zone", { id: "z", desired_ram: 4096 }), 404);
    assertError(await put(t.socket, "vm.resize-disk", { id: "d", desired_size: 4096 }), 404);
    assertError(await put(t.socket, "vm.snapshot", { destination_url: "file:///tmp/s" }), 404);
    assertError(await put(t.socket, "vm.coredump", { destination_url: "file:///tmp/c" }), 404);
    assertError(await put(t.socket, "vm.send-migration", { destination_url: "unix:/tmp/m" }), 404);
    assertError(
      await put(t.socket, "vm.restore", { source_url: "file:///nonexistent/snap" }),
      400,
      /cannot read the snapshot in \/nonexistent\/snap/,
    );
    assertError(
      await put(t.socket, "vm.receive-migration", { receiver_url: "file:///tmp/m" }),
      400,
      /use unix:PATH or tcp:HOST:PORT/,
    );
    const del = await put(t.socket, "vm.delete");
    assert.equal(del.status, 204);
    assert.equal(del.body, "");
  } finally {
    await t.close();
  }
});

Deno.test("api: invalid bodies answer 400 naming the field; oversized bodies 413", async () => {
  const t = await startTestServer();
  try {
    assertError(await put(t.socket, "vm.create"), 400, /needs a JSON VmConfig body/);
    assertError(await put(t.socket, "vm.create", "{not json"), 400, /not valid JSON/);
    assertError(await put(t.socket, "vm.create", "[1,2]"), 400, /must be a JSON object/);
    assertError(await put(t.socket, "vm.create", "null"), 400);
    assertError(
      await put(t.socket, "vm.create", { ...EXAMPLE_VM, cpus: { boot_vcpus: "four", max_vcpus: 4 } }),
      400,
      /cpus\.boot_vcpus: Expected number, received string/,
    );
    assertError(
      await put(t.socket, "vm.create", { ...EXAMPLE_VM, cpus: { boot_vcpus: 8, max_vcpus: 4 } }),
      400,
      /boot_vcpus \(8\) must not exceed max_vcpus \(4\)/,
    );
    assertError(
      await put(t.socket, "vm.create", { cpus: { boot_vcpus: 1, max_vcpus: 1 } }),
      400,
      /payload: required/,
    );
    assertError(
      await put(t.socket, "vm.create", { ...EXAMPLE_VM, net: [{ fds: [3] }] }),
      400,
      /fds: file descriptors cannot be given/,
    );
    assertError(await put(t.socket, "vm.resize", {}), 400, /at least one of/);
    // As serde (Cloud Hypervisor's reader): a member named twice is refused, not silently the last one.
    assertError(
      await put(t.socket, "vm.create", '{"payload":{"kernel":"/k","kernel":"/j"}}'),
      400,
      /names the field 'payload.kernel' twice/,
    );
    // Thousands of devices are refused up front: a PCI segment has 31 slots.
    assertError(
      await put(t.socket, "vm.create", {
        ...EXAMPLE_VM,
        disks: Array.from({ length: 40 }, (_, i) => ({ path: `/d${i}` })),
      }),
      400,
      /PCI devices on segment 0: a segment has 31 device slots/,
    );
    assertError(await put(t.socket, "vm.add-vsock", { cid: 2, socket: "/x" }), 400, /cid: guest CIDs/);

    const big = JSON.stringify({ ...EXAMPLE_VM, payload: { kernel: "/k", cmdline: "x".repeat(2 << 20) } });
    assertError(await put(t.socket, "vm.create", big), 413, /exceeds the limit/);
    // Without a Content-Length (chunked), as Cloud Hypervisor's server: refused, nothing read as a body.
    const head = "PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n" +
      "Connection: close\r\n\r\n";
    const chunk = "y".repeat(256 * 1024);
    let req = head;
    for (let i = 0; i < 6; i++) req += `${chunk.length.toString(16)}\r\n${chunk}\r\n`;
    req += "0\r\n\r\n";
    const r = parseResponse(await exchange(t.socket, new TextEncoder().encode(req)));
    assert.equal(r.status, 400);
    assert.match(r.body, /Transfer-Encoding is not supported/);
    // Nothing was created by any of that.
    assertError(await get(t.socket, "vm.info"), 404);
  } finally {
    await t.close();
  }
});

Deno.test("api: configs are read as Cloud Hypervisor reads them: unknown fields ignored, null absent", async () => {
  const t = await startTestServer();
  try {
    const body = {
      ...EXAMPLE_VM,
      colour: "blue",
      disks: [{ path: "/x", turbo: true, rate_limiter_config: null, id: null }],
      balloon: null,
      memory: { size: 1 << 30, hotplug_size: null, zones: null },
    };
    assert.equal((await put(t.socket, "vm.create", body)).status, 204);
    const config = JSON.parse((await get(t.socket, "vm.info")).body).config;
    assert.equal(config.colour, undefined, "unknown fields are not kept");
    assert.equal(config.disks[0].turbo, undefined);
    assert.equal(config.disks[0].path, "/x");
    assert.equal(config.memory.size, 1 << 30);
    assert.equal(config.balloon ?? null, null);
  } finally {
    await t.close();
  }
});

Deno.test("api: VM life cycle status codes over the socket", async () => {
  const t = await startTestServer();
  try {
    assert.equal((await put(t.socket, "vm.create", EXAMPLE_VM)).status, 204);
    assertError(await put(t.socket, "vm.create", EXAMPLE_VM), 405, /already created/);
    let info = await get(t.socket, "vm.info");
    assert.equal(info.status, 200);
    assert.equal(JSON.parse(info.body).state, "Created");
    assert.equal(JSON.parse(info.body).config.memory.size, 512 << 20);
    assertError(await put(t.socket, "vm.pause"), 405, /not booted/);
    assertError(await put(t.socket, "vm.resume"), 405);
    assertError(await get(t.socket, "vm.counters"), 405);
    assertError(await put(t.socket, "vm.restore", { source_url: "file:///tmp/s" }), 404, /already created/);

    // Cold plug while not booted (the document's 204), and identifier clashes (409).
    assert.equal((await put(t.socket, "vm.add-disk", { path: "/tmp/b.img", id: "data" })).status, 204);
    assertError(
      await put(t.socket, "vm.add-disk", { path: "/tmp/c.img", id: "data" }),
      409,
      /already exists/,
    );
    assertError(await put(t.socket, "vm.remove-device", { id: "ghost" }), 404, /no device/);
    assert.equal((await put(t.socket, "vm.remove-device", { id: "data" })).status, 204);

    assert.equal((await put(t.socket, "vm.boot")).status, 204);
    assertError(await put(t.socket, "vm.boot"), 405, /already booted/);
    assertError(await put(t.socket, "vm.resume"), 405, /not paused/);
    assertError(
      await put(t.socket, "vm.snapshot", { destination_url: "file:///tmp/s" }),
      405,
      /paused first/,
    );
    assert.equal((await put(t.socket, "vm.pause")).status, 204);
    assertError(await put(t.socket, "vm.pause"), 405, /already paused/);
    assertError(
      await put(t.socket, "vm.snapshot", { destination_url: "file:///tmp/s" }),
      500,
      /not implemented in dvmm/,
    );
    assert.equal((await put(t.socket, "vm.resume")).status, 204);

    info = await get(t.socket, "vm.info");
    assert.equal(JSON.parse(info.body).state, "Running");
    assert.ok(JSON.parse(info.body).device_tree);
    const counters = await get(t.socket, "vm.counters");
    assert.equal(counters.status, 200);
    assert.equal(typeof JSON.parse(counters.body), "object");

    assertError(
      await put(t.socket, "vm.add-disk", { path: "/tmp/hot.img" }),
      500,
      /hot-adding disk devices is not implemented/,
    );
    assertError(await put(t.socket, "vm.resize", { desired_vcpus: 9 }), 400, /exceeds max_vcpus/);
    assert.equal((await put(t.socket, "vm.power-button")).status, 204);
    assert.equal((await put(t.socket, "vm.nmi")).status, 204);
    assert.equal((await put(t.socket, "vm.reboot")).status, 204);
    assert.equal(t.made.length, 2);
    assert.equal((await put(t.socket, "vm.shutdown")).status, 204);
    assertError(await put(t.socket, "vm.shutdown"), 405);
    assert.equal(JSON.parse((await get(t.socket, "vm.info")).body).state, "Shutdown");
    assert.equal((await put(t.socket, "vm.delete")).status, 204);
    assertError(await get(t.socket, "vm.info"), 404);

    assert.equal((await put(t.socket, "vmm.shutdown")).status, 204);
    assert.equal(await t.loop.exited, 0);
  } finally {
    await t.close();
  }
});

Deno.test("api: garbage on the socket does not take the server down", async () => {
  const t = await startTestServer();
  try {
    const junk = [
      new Uint8Array([0, 1, 2, 3, 255, 254, 13, 10, 13, 10]),
      new TextEncoder().encode("GARBAGE\r\n\r\n"),
      new TextEncoder().encode("PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n{"),
      new TextEncoder().encode("GET /api/v1/vmm.ping HTTP/9.9\r\n\r\n"),
      crypto.getRandomValues(new Uint8Array(4096)),
    ];
    for (const bytes of junk) {
      const conn = await Deno.connect({ transport: "unix", path: t.socket });
      await conn.write(bytes).catch(() => {});
      const buf = new Uint8Array(1024);
      await Promise.race([conn.read(buf).catch(() => null), new Promise((r) => setTimeout(r, 200))]);
      conn.close();
    }
    // A client that connects and hangs up at once.
    (await Deno.connect({ transport: "unix", path: t.socket })).close();
    const ping = await get(t.socket, "vmm.ping");
    assert.equal(ping.status, 200);
  } finally {
    await t.close();
  }
});

Deno.test("api: concurrent clients all get their answers", async () => {
  const t = await startTestServer();
  try {
    await put(t.socket, "vm.create", EXAMPLE_VM);
    const results = await Promise.all(
      Array.from(
        { length: 64 },
        (_, i) =>
          i % 3 === 0
            ? get(t.socket, "vmm.ping")
            : i % 3 === 1
            ? get(t.socket, "vm.info")
            : put(t.socket, "vm.nmi"),
      ),
    );
    results.forEach((r, i) => {
      if (i % 3 === 2) assert.equal(r.status, 405); // not booted
      else assert.equal(r.status, 200);
    });
    // Concurrent boots: exactly one wins, the others see the VM already booted.
    const boots = await Promise.all(Array.from({ length: 8 }, () => put(t.socket, "vm.boot")));
    assert.equal(boots.filter((r) => r.status === 204).length, 1);
    assert.equal(boots.filter((r) => r.status === 405).length, 7);
    assert.equal(t.made.length, 1);
  } finally {
    await t.close();
  }
});

Deno.test("api: the socket is private, stale sockets are replaced, live ones refused", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-sock-" });
  const path = `${dir}/s.sock`;
  const loop = new ControlLoop({ factory: fakeFactory().factory });
  try {
    // A stale socket file: bound by a process that is gone (Deno.exit skips the unlink).
    const code = `Deno.listen({ transport: "unix", path: ${JSON.stringify(path)} }); Deno.exit(0);`;
    await new Deno.Command(Deno.execPath(), { args: ["eval", code] }).output();
    assert.ok((await Deno.lstat(path)).isSocket);
    const server = await startApiServer({ path }, loop);
    assert.equal((await Deno.stat(path)).mode! & 0o777, 0o600);
    await assert.rejects(() => startApiServer({ path }, loop), /in use by another process/);
    assert.equal((await get(path, "vmm.ping")).status, 200);
    await server.close();
    await assert.rejects(() => Deno.lstat(path), Deno.errors.NotFound);

    await Deno.writeTextFile(path, "not a socket");
    await assert.rejects(() => startApiServer({ path }, loop), /not a socket/);
    // fd 97 is not open: an inherited descriptor must be a listening socket (see api_fd_test.ts).
    await assert.rejects(() => startApiServer({ fd: 97 }, loop), /fd=97: not an open, listening socket/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("api: error bodies read as message lists", async () => {
  const t = await startTestServer();
  try {
    const r = await put(t.socket, "vm.boot");
    assert.deepEqual(errorMessages(r), ["the VM is not created"]);
  } finally {
    await t.close();
  }
});
