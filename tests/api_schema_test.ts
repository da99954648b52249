/**
 * Replies of a real dvmm — a real VM on this machine's /dev/kvm, with a disk and the default rng and
 * console devices — checked against the response schemas of dvmm's OpenAPI document.
 */
import assert from "node:assert/strict";
import { apiRequest } from "../api/client.ts";
import { startApiServer } from "../api/server.ts";
import { ControlLoop } from "../vmm/control.ts";
import { createVmBackend } from "../vmm/vm.ts";
import { checkSchema } from "./helpers/json_schema.ts";
import { kvmAvailable } from "./helpers/realmode.ts";
import { pvhElf } from "./helpers/tiny_guest.ts";

const doc = JSON.parse(await Deno.readTextFile(new URL("../api/openapi.json", import.meta.url)));

function responseSchema(endpoint: string, method: string, status: number) {
  const s = doc.paths[`/${endpoint}`]?.[method]?.responses?.[String(status)]?.content?.["application/json"]
    ?.schema;
  assert.ok(s, `the document gives a JSON schema for ${method.toUpperCase()} /${endpoint} ${status}`);
  return s;
}

Deno.test({
  name: "api: ping, info and counters of a running VM match the document's response schemas",
  ignore: !kvmAvailable(),
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-schema-" });
  const loop = new ControlLoop({ factory: createVmBackend });
  const socket = `${dir}/api.sock`;
  const server = await startApiServer({ path: socket }, loop);
  try {
    await Deno.writeFile(`${dir}/guest.elf`, pvhElf(new Uint8Array([0xeb, 0xfe]))); // spins
    await Deno.writeFile(`${dir}/disk.img`, new Uint8Array(1 << 20));
    const config = {
      cpus: { boot_vcpus: 2, max_vcpus: 2 },
      memory: { size: 64 << 20 },
      payload: { kernel: `${dir}/guest.elf` },
      disks: [{ path: `${dir}/disk.img`, id: "disk0" }],
      serial: { mode: "Null" },
      console: { mode: "Null" },
    };
    assert.equal((await apiRequest(socket, "PUT", "/api/v1/vm.create", config)).status, 204);
    assert.equal((await apiRequest(socket, "PUT", "/api/v1/vm.boot")).status, 204);
    for (const [method, endpoint] of [["get", "vmm.ping"], ["get", "vm.info"], ["get", "vm.counters"]]) {
      const r = await apiRequest(socket, method.toUpperCase(), `/api/v1/${endpoint}`);
      assert.equal(r.status, 200, `${endpoint}: ${r.body}`);
      const body = JSON.parse(r.body);
      assert.deepEqual(
        checkSchema(responseSchema(endpoint, method, 200), body, doc),
        [],
        `${endpoint}: ${r.body}`,
      );
      if (endpoint === "vm.info") {
        assert.equal(body.state, "Running");
        const bdfs = Object.values(body.device_tree as Record<string, { pci_bdf?: string }>)
          .map((n) => n.pci_bdf).filter(Boolean);
        assert.ok(bdfs.length >= 2, `PCI devices listed with their BDF: ${r.body}`);
      }
      if (endpoint === "vm.counters") assert.ok(body.disk0 && "read_bytes" in body.disk0, r.body);
    }
    // An error reply: a JSON array of messages.
    const err = await apiRequest(socket, "PUT", "/api/v1/vm.resume");
    assert.equal(err.status, 405);
    assert.deepEqual(checkSchema(responseSchema("vm.resume", "put", 405), JSON.parse(err.body), doc), []);
    assert.equal((await apiRequest(socket, "PUT", "/api/v1/vm.shutdown")).status, 204);
  } finally {
    await loop.request("vmm.shutdown").catch(() => {});
    await server.close();
    await Deno.remove(dir, { recursive: true });
  }
});
