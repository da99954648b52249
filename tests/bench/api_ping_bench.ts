/**
 * vmm.ping over the API socket of a real `dvmm --api-socket` process (idle, no VM).
 *
 *   deno run -A tests/bench/api_ping_bench.ts [--clients 1,4,16] [--requests 2000] [--busy] [--main PATH]
 *
 * prints latency p50/p99 and throughput for N concurrent clients, both with one connection per
 * request (as curl and `dvmm remote` do) and with kept-alive connections (fetch over the socket). The
 * one-connection-per-request rows are set beside a bare HTTP answer on a UNIX socket from another Deno
 * process (unix_http_echo.ts), measured by the same client in the same run: the p99 ratio is the figure.
 * With --busy the server first creates and boots a real 2-vCPU guest (through the API) that spins in a
 * loop, so both host cores are taken by vCPU threads while the API answers. Under `deno bench` it
 * registers a single-request benchmark instead. `--main` runs another checkout's main.ts as the server
 * (e.g. a worktree of an older commit), to compare servers in one run with the same client.
 */
import { parseArgs } from "node:util";
import { apiRequest } from "../../api/client.ts";
import { startApiServer } from "../../api/server.ts";
import { ControlLoop } from "../../vmm/control.ts";
import { pvhElf } from "../helpers/tiny_guest.ts";

async function startDvmm(main: string): Promise<{ socket: string; stop: () => Promise<void> }> {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-bench-" });
  const socket = `${dir}/api.sock`;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", "--quiet", main, "--api-socket", `path=${socket}`],
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

/**
 * 32-bit guest code that keeps both vCPUs busy: it writes a real-mode `jmp $` at 0x8000, starts the AP
 * there with INIT + SIPI through the local APIC's ICR, then spins itself.
 */
const BUSY_SMP_GUEST = new Uint8Array([
  0x66,
  0xc7,
  0x05,
  0x00,
  0x80,
  0x00,
  0x00,
  0xeb,
  0xfe, // mov word [0x8000], 0xfeeb (jmp $)
  0xc7,
  0x05,
  0x10,
  0x03,
  0xe0,
  0xfe,
  0x00,
  0x00,
  0x00,
  0x01, // ICR high: destination APIC id 1
  0xc7,
  0x05,
  0x00,
  0x03,
  0xe0,
  0xfe,
  0x00,
  0x45,
  0x00,
  0x00, // ICR low: INIT
  0xc7,
  0x05,
  0x00,
  0x03,
  0xe0,
  0xfe,
  0x08,
  0x46,
  0x00,
  0x00, // ICR low: SIPI, vector 0x08 -> 0x8000
  0xeb,
  0xfe, // jmp $
]);

/** Creates and boots, through the API, a 2-vCPU guest whose vCPUs both spin until shut down. */
async function bootBusyGuest(socket: string): Promise<void> {
  const kernel = await Deno.makeTempFile({ prefix: "dvmm-busy-", suffix: ".elf" });
  await Deno.writeFile(kernel, pvhElf(BUSY_SMP_GUEST));
  const config = {
    cpus: { boot_vcpus: 2, max_vcpus: 2 },
    memory: { size: 64 << 20 },
    payload: { kernel },
    serial: { mode: "Null" },
    console: { mode: "Off" },
  };
  for (
    const [path, body] of [["/api/v1/vm.create", JSON.stringify(config)], ["/api/v1/vm.boot", undefined]]
  ) {
    const res = await apiRequest(socket, "PUT", path!, body);
    if (res.status !== 204) throw new Error(`${path}: ${res.status} ${res.body}`);
  }
  // Let the AP start before measuring.
  await new Promise((r) => setTimeout(r, 500));
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
      busy: { type: "boolean", default: false },
      main: { type: "string", default: new URL("../../main.ts", import.meta.url).pathname },
    },
  });
  const total = Number(values.requests);
  const { socket, stop } = await startDvmm(values.main!);
  // The baseline: a bare HTTP answer on a UNIX socket from another Deno process (unix_http_echo.ts).
  const echoDir = await Deno.makeTempDir({ prefix: "dvmm-echo-" });
  const echoSocket = `${echoDir}/echo.sock`;
  const echo = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--quiet", new URL("./unix_http_echo.ts", import.meta.url).pathname, echoSocket],
    stdout: "null",
  }).spawn();
  for (let i = 0; i < 400; i++) {
    try {
      if ((await Deno.lstat(echoSocket)).isSocket) break;
    } catch { /* not yet */ }
    await new Promise((r) => setTimeout(r, 25));
  }
  const ratios: string[] = [];
  try {
    if (values.busy) await bootBusyGuest(socket);
    // Warm up both paths.
    for (let i = 0; i < 100; i++) await apiRequest(socket, "GET", "/api/v1/vmm.ping");
    for (let i = 0; i < 100; i++) await apiRequest(echoSocket, "GET", "/api/v1/vmm.ping");
    console.log("mode          clients  p50 ms  p99 ms  req/s   (echo baseline: p50 ms  p99 ms)  p99 ratio");
    for (const c of String(values.clients).split(",").map(Number)) {
      const ping = (sock: string) => async () => {
        const res = await apiRequest(sock, "GET", "/api/v1/vmm.ping");
        if (res.status !== 200) throw new Error(`ping: ${res.status}`);
      };
      const r = await measure(c, total, ping(socket));
      const e = await measure(c, total, ping(echoSocket));
      ratios.push(`p99_ratio_c${c}=${(r.p99 / e.p99).toFixed(2)}`);
      console.log(
        `per-connection ${String(c).padStart(6)}  ${r.p50.toFixed(3).padStart(6)}  ${
          r.p99.toFixed(3).padStart(6)
        }  ${r.rps.toFixed(0).padStart(5)}   ${e.p50.toFixed(3).padStart(17)}  ${
          e.p99.toFixed(3).padStart(6)
        }  ${(r.p99 / e.p99).toFixed(2).padStart(9)}`,
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
    console.log(`api: ${ratios.join(" ")} busy=${values.busy} requests=${total}`);
  } finally {
    await stop();
    echo.kill();
    await echo.status;
    await Deno.remove(echoDir, { recursive: true }).catch(() => {});
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
