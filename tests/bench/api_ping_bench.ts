/**
 * vmm.ping over the API socket of a real `dvmm --api-socket` process (idle, no VM).
 *
 *   deno run -A tests/bench/api_ping_bench.ts [--clients 1,4,16] [--requests 2000]
 *
 * prints latency p50/p99 and throughput for N concurrent clients, both with one connection per
 * request (as curl and `dvmm remote` do) and with kept-alive connections (fetch over the socket).
 * Under `deno bench` it registers a single-request benchmark instead.
 */
import { parseArgs } from "node:util";
import { apiRequest } from "../../api/client.ts";
import { startApiServer } from "../../api/server.ts";
import { ControlLoop } from "../../vmm/control.ts";

const MAIN = new URL("../../main.ts", import.meta.url).pathname;

async function startDvmm(): Promise<{ socket: string; stop: () => Promise<void> }> {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-bench-" });
  const socket = `${dir}/api.sock`;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", "--quiet", MAIN, "--api-socket", `path=${socket}`],
    stdout: "null",
    stderr: "inherit",
  }).spawn();
  for (let i = 0; i < 400; i++) {
    try {
      if ((await Deno.lstat(socket)).isSocket) break;
    } catch { /* not yet */ }
    await new Promise((r) => setTimeout(r, 25));
  }
  return {
    socket,
    stop: async () => {
      await apiRequest(socket, "PUT", "/api/v1/vmm.shutdown").catch(() => {});
      await child.status;
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}

function pct(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function measure(clients: number, total: number, one: () => Promise<void>) {
  const lat: number[] = [];
  let next = 0;
  const t0 = performance.now();
  await Promise.all(Array.from({ length: clients }, async () => {
    while (next++ < total) {
      const s = performance.now();
      await one();
      lat.push(performance.now() - s);
    }
  }));
  const secs = (performance.now() - t0) / 1000;
  lat.sort((a, b) => a - b);
  return { p50: pct(lat, 50), p99: pct(lat, 99), rps: lat.length / secs };
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      clients: { type: "string", default: "1,4,16" },
      requests: { type: "string", default: "2000" },
    },
  });
  const total = Number(values.requests);
  const { socket, stop } = await startDvmm();
  try {
    // Warm up both paths.
    for (let i = 0; i < 100; i++) await apiRequest(socket, "GET", "/api/v1/vmm.ping");
    console.log("mode          clients  p50 ms  p99 ms  req/s");
    for (const c of String(values.clients).split(",").map(Number)) {
      const r = await measure(c, total, async () => {
        const res = await apiRequest(socket, "GET", "/api/v1/vmm.ping");
        if (res.status !== 200) throw new Error(`ping: ${res.status}`);
      });
      console.log(
        `per-connection ${String(c).padStart(6)}  ${r.p50.toFixed(3).padStart(6)}  ${
          r.p99.toFixed(3).padStart(6)
        }  ${r.rps.toFixed(0).padStart(5)}`,
      );
      const clientsHttp = Array.from(
        { length: c },
        () => Deno.createHttpClient({ proxy: { transport: "unix", path: socket } }),
      );
      let k = 0;
      const r2 = await measure(c, total, async () => {
        const res = await fetch("http://localhost/api/v1/vmm.ping", { client: clientsHttp[k++ % c] });
        await res.arrayBuffer();
        if (res.status !== 200) throw new Error(`ping: ${res.status}`);
      });
      clientsHttp.forEach((h) => h.close());
      console.log(
        `keep-alive     ${String(c).padStart(6)}  ${r2.p50.toFixed(3).padStart(6)}  ${
          r2.p99.toFixed(3).padStart(6)
        }  ${r2.rps.toFixed(0).padStart(5)}`,
      );
    }
  } finally {
    await stop();
  }
} else {
  // Under `deno bench`: the same server and control loop, in this process (no child to clean up).
  const dir = await Deno.makeTempDir({ prefix: "dvmm-bench-" });
  const socket = `${dir}/api.sock`;
  const loop = new ControlLoop({
    factory: () => {
      throw new Error("no VM in this benchmark");
    },
  });
  await startApiServer({ path: socket }, loop);
  globalThis.addEventListener("unload", () => {
    try {
      Deno.removeSync(dir, { recursive: true });
    } catch { /* gone */ }
  });
  Deno.bench("vmm.ping (one connection per request)", async () => {
    await apiRequest(socket, "GET", "/api/v1/vmm.ping");
  });
}
