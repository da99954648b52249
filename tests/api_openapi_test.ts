import assert from "node:assert/strict";
import { ROUTES } from "../api/server.ts";
import { buildOpenApi } from "../api/openapi.ts";

const doc = JSON.parse(await Deno.readTextFile(new URL("../api/openapi.json", import.meta.url)));
type Op = {
  requestBody?: { content: { "application/json": { schema: { $ref: string } } } };
  responses: object;
};

Deno.test("openapi: every served route is documented with its method and body", () => {
  for (const [name, route] of Object.entries(ROUTES)) {
    const item = doc.paths[`/${name}`];
    assert.ok(item, `/${name} is served but not in api/openapi.json`);
    const methods = Object.keys(item);
    assert.deepEqual(methods, [route.method.toLowerCase()], `/${name} methods`);
    const op: Op = item[route.method.toLowerCase()];
    const ref = op.requestBody?.content["application/json"].schema.$ref;
    assert.equal(ref, route.bodyName ? `#/components/schemas/${route.bodyName}` : undefined, `/${name} body`);
  }
});

Deno.test("openapi: every documented path is served", () => {
  for (const path of Object.keys(doc.paths)) {
    assert.ok(Object.hasOwn(ROUTES, path.slice(1)), `${path} is documented but not served`);
  }
});

Deno.test("openapi: the Cloud Hypervisor endpoints are all there", () => {
  const expected = [
    "vmm.ping",
    "vmm.shutdown",
    "vm.info",
    "vm.counters",
    "vm.create",
    "vm.delete",
    "vm.boot",
    "vm.pause",
    "vm.resume",
    "vm.shutdown",
    "vm.reboot",
    "vm.power-button",
    "vm.resize",
    "vm.resize-disk",
    "vm.resize-zone",
    "vm.add-device",
    "vm.remove-device",
    "vm.add-disk",
    "vm.add-fs",
    "vm.add-generic-vhost-user",
    "vm.add-pmem",
    "vm.add-net",
    "vm.add-vsock",
    "vm.add-vdpa",
    "vm.add-user-device",
    "vm.snapshot",
    "vm.coredump",
    "vm.nmi",
    "vm.restore",
    "vm.receive-migration",
    "vm.send-migration",
  ];
  assert.deepEqual(Object.keys(doc.paths).map((p) => p.slice(1)).sort(), expected.sort());
  assert.ok(["GET"].every((m) => ROUTES["vmm.ping"].method === m && ROUTES["vm.info"].method === m));
});

Deno.test("openapi: every $ref resolves", () => {
  const refs = JSON.stringify(doc).match(/"#\/components\/schemas\/[A-Za-z]+"/g) ?? [];
  for (const r of new Set(refs)) {
    const name = JSON.parse(r).split("/").pop();
    assert.ok(doc.components.schemas[name], `dangling ${r}`);
  }
});

Deno.test("openapi: the committed document matches the schemas (run `deno run api/openapi.ts > api/openapi.json`)", () => {
  assert.deepEqual(doc, JSON.parse(JSON.stringify(buildOpenApi())));
});
