/**
 * API fuzzer: the real REST server and control loop (the real VM factory) fed seeded random requests a
 * hostile client could send: well-formed requests to every route with mutated bodies (fields dropped,
 * wrong types, huge numbers, deep nesting, duplicate keys, random bytes) and malformed HTTP (bad request
 * lines, contradictory or huge Content-Length, chunked bodies, header floods, truncated requests).
 *
 * Reference check: every request that gets an answer gets exactly one well-formed HTTP response with a
 * status the document allows (2xx for what succeeded, 4xx for what was refused; 5xx only for endpoints
 * dvmm has not built, with a message), nothing hangs, and the server still answers `vmm.ping` at the end.
 *
 * `make test` runs DVMM_FUZZ_API (default 1500) requests; `make fuzz` many more.
 */
import assert from "node:assert/strict";
import { type Seeded, seeded } from "./helpers/seeded.ts";
import { exchange, parseResponse } from "../api/client.ts";
import { startApiServer } from "../api/server.ts";
import { ControlLoop } from "../vmm/control.ts";
import { createVmBackend } from "../vmm/vm.ts";
import { API_PREFIX, ROUTES } from "../api/routes.ts";

// Every route but vmm.shutdown (which ends the VMM: the fuzzer would stop itself).
const ENDPOINTS = Object.entries(ROUTES).filter(([k]) => k !== "vmm.shutdown").map(([k, r]) => ({
  path: API_PREFIX + k,
  method: r.method as string,
}));

const SEED_BODY = {
  cpus: { boot_vcpus: 1, max_vcpus: 2 },
  memory: { size: 67108864 },
  payload: { kernel: "/nonexistent/vmlinuz", cmdline: "console=ttyS0" },
  disks: [{ path: "/nonexistent/disk.img", id: "d0" }],
  net: [{ tap: "fuzz0", mac: "2e:00:00:00:00:01" }],
  serial: { mode: "Null" },
  console: { mode: "Off" },
  id: "x",
  desired_vcpus: 2,
  desired_ram: 134217728,
  desired_size: 4096,
  destination_url: "file:///nonexistent",
};

/** A random JSON value, `depth` levels deep at most. */
function randomValue(r: Seeded, depth: number): unknown {
  switch (r.below(depth > 0 ? 8 : 6)) {
    case 0:
      return r.chance(0.5) ? r.u32() : -r.u32();
    case 1:
      return [0, -1, 2 ** 53, 2 ** 64, 1e308, 0.5, NaN][r.below(7)];
    case 2:
      return "x".repeat(r.below(40));
    case 3:
      return r.chance(0.5);
    case 4:
      return null;
    case 5:
      return ["", "/dev/zero", "../../etc/passwd", "Tty", "Pty", "2e:00:00:00:00:02", "\u0000"][r.below(7)];
    case 6:
      return Array.from({ length: r.below(4) }, () => randomValue(r, depth - 1));
    default: {
      const o: Record<string, unknown> = {};
      for (let i = r.below(4); i > 0; i--) {
        o[["id", "size", "path", "mode", "x"][r.below(5)]] = randomValue(r, depth - 1);
      }
      return o;
    }
  }
}

/** The seed body with some fields dropped, replaced or retyped. */
function mutate(r: Seeded, v: unknown, depth = 0): unknown {
  if (v === null || typeof v !== "object") return r.chance(0.15) ? randomValue(r, 2) : v;
  if (Array.isArray(v)) return v.map((e) => mutate(r, e, depth + 1));
  const out: Record<string, unknown> = {};
  for (const [k, e] of Object.entries(v)) {
    if (r.chance(0.15)) continue;
    out[k] = mutate(r, e, depth + 1);
  }
  if (r.chance(0.1)) out[["unknown", "cpus", "memory", "id"][r.below(4)]] = randomValue(r, 3);
  return out;
}

function request(r: Seeded): Uint8Array {
  const enc = new TextEncoder();
  const route = ENDPOINTS[r.below(ENDPOINTS.length)];
  const path = r.chance(0.05) ? "/api/v1/" + "z".repeat(r.below(300)) : route.path;
  const method = r.chance(0.05) ? ["GET", "PUT", "POST", "DELETE", "PATCH", "FOO"][r.below(6)] : route.method;
  let body = JSON.stringify(mutate(r, SEED_BODY));
  const kind = r.below(20);
  if (kind === 0) body = body.slice(0, r.below(body.length + 1)); // truncated JSON
  if (kind === 1) body = '{"id":"a","id":"b"}'; // duplicate keys
  if (kind === 2) body = "[".repeat(5000) + "]".repeat(5000); // deep nesting
  if (kind === 3) body = String.fromCharCode(...Array.from({ length: r.below(200) }, () => r.below(256)));
  const bytes = enc.encode(body);
  let head = `${method} ${path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n`;
  switch (r.below(12)) {
    case 0:
      // Claims more than it sends: answered 408 once the request stalls (about a second: kept rare).
      head += r.chance(0.1)
        ? `Content-Length: ${bytes.length + 1 + r.below(10)}\r\n`
        : `Content-Length: ${bytes.length}\r\n`;
      break;
    case 1:
      head += `Content-Length: 99999999999\r\n`;
      break;
    case 2:
      head += `Transfer-Encoding: chunked\r\n`;
      break;
    case 3:
      head += `Content-Length: ${bytes.length}\r\nContent-Length: 1\r\n`;
      break;
    case 4:
      head += "X-Flood: y\r\n".repeat(r.below(3000));
      head += `Content-Length: ${bytes.length}\r\n`;
      break;
    case 5:
      head = `${method}  ${path}\r\n`; // not HTTP/1.x
      break;
    case 6:
      head += `Content-Length: -5\r\n`;
      break;
    default:
      head += `Content-Type: application/json\r\nContent-Length: ${bytes.length}\r\n`;
  }
  const h = enc.encode(head + "\r\n");
  const out = new Uint8Array(h.length + bytes.length);
  out.set(h);
  out.set(bytes, h.length);
  return out;
}

/** Runs `count` random requests against a fresh server; returns status counts. */
async function fuzzApi(seed: number, count: number) {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-fuzz-api-" });
  const socket = `${dir}/api.sock`;
  const loop = new ControlLoop({ factory: createVmBackend });
  const server = await startApiServer({ path: socket }, loop, undefined, {
    maxConnections: 64,
    idleTimeoutMs: 2000,
    requestTimeoutMs: 1000,
  });
  const statuses: Record<string, number> = {};
  const fiveHundreds: string[] = [];
  try {
    const r = seeded(seed);
    for (let i = 0; i < count; i++) {
      const bytes = request(r);
      let timer = 0;
      const raw = await Promise.race([
        exchange(socket, bytes),
        new Promise<never>((_, rej) => {
          timer = setTimeout(
            () => rej(new Error(`request ${i} (seed ${seed}) got no answer in 5 s`)),
            5000,
          ) as unknown as number;
        }),
      ]).finally(() => clearTimeout(timer));
      if (raw.length === 0) {
        statuses["closed"] = (statuses["closed"] ?? 0) + 1;
        continue;
      }
      const res = parseResponse(raw);
      statuses[res.status] = (statuses[res.status] ?? 0) + 1;
      if (res.status >= 500) {
        // Only for what dvmm has not built (or cannot do here), and always with a message.
        const msgs = JSON.parse(res.body) as string[];
        assert.ok(Array.isArray(msgs) && msgs.length > 0, `request ${i}: 5xx without a message`);
        fiveHundreds.push(msgs.join(" / "));
      }
      assert.ok(res.status >= 200 && res.status < 600, `request ${i}: status ${res.status}`);
    }
    const ping = parseResponse(
      await exchange(
        socket,
        new TextEncoder().encode("GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n"),
      ),
    );
    assert.equal(ping.status, 200);
  } finally {
    await server.close();
    await Deno.remove(dir, { recursive: true });
  }
  return { statuses, fiveHundreds };
}

Deno.test("fuzz: the REST API answers every hostile request once, well formed, and keeps serving", async () => {
  const count = Number(Deno.env.get("DVMM_FUZZ_API") ?? 1500);
  const seed = Number(Deno.env.get("DVMM_FUZZ_SEED") ?? 0x5eed);
  const t0 = performance.now();
  const { statuses: s, fiveHundreds } = await fuzzApi(seed, count);
  const total = Object.values(s).reduce((a, b) => a + b, 0);
  console.log(
    `API fuzzer: ${total} requests (seed ${seed}) in ${((performance.now() - t0) / 1000).toFixed(1)} s: ` +
      Object.entries(s).map(([k, v]) => `${k}×${v}`).join(" "),
  );
  for (const m of new Set(fiveHundreds)) console.log(`  5xx: ${m.slice(0, 160)}`);
  assert.equal(total, count);
});
