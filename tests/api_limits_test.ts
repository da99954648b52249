/**
 * The API cannot be starved (issue: fd exhaustion killed the VMM and its guest): the real `main.ts` as a
 * subprocess at `ulimit -n 1024` with a running VM, and 1,100 idle connections held by another process.
 * The VMM stays up, the VM keeps running, and a new client's ping and vm.info are answered (idle
 * connections give way at the connection cap). Then the flood goes and the VMM shuts down cleanly.
 */
import assert from "node:assert/strict";
import { kvmAvailable } from "./helpers/realmode.ts";
import { pvhElf } from "./helpers/tiny_guest.ts";
import { apiRequest } from "../api/client.ts";

const MAIN = new URL("../main.ts", import.meta.url).pathname;
const FLOOD = new URL("./helpers/conn_flood.ts", import.meta.url).pathname;

async function waitFor(path: string, ms = 30000): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    try {
      if ((await Deno.lstat(path)).isSocket) return;
    } catch { /* not yet */ }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${path} did not appear`);
}

Deno.test({
  name: "api: 1,100 idle connections at ulimit -n 1024 with a running VM: ping and info still answer",
  ignore: !kvmAvailable(),
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-limits-" });
  const socket = `${dir}/api.sock`;
  await Deno.writeFile(`${dir}/guest.elf`, pvhElf(new Uint8Array([0xeb, 0xfe]))); // spins
  const deno = Deno.execPath();
  const vmm = new Deno.Command("bash", {
    args: [
      "-c",
      `ulimit -n 1024 && exec "$0" run --allow-all --quiet --no-prompt "$1" --api-socket "path=$2" ` +
      `--kernel "$3" --memory size=64M --serial null --console off`,
      deno,
      MAIN,
      socket,
      `${dir}/guest.elf`,
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const flood = new Deno.Command("bash", {
    args: ["-c", `ulimit -n 4096 2>/dev/null; exec "$0" run -A --quiet "$1" "$2" 1100`, deno, FLOOD, socket],
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  });
  let floodProc: Deno.ChildProcess | null = null;
  try {
    await waitFor(socket);
    // The VM runs before the flood.
    let info = await apiRequest(socket, "GET", "/api/v1/vm.info");
    for (let i = 0; i < 300 && JSON.parse(info.body).state !== "Running"; i++) {
      await new Promise((r) => setTimeout(r, 100));
      info = await apiRequest(socket, "GET", "/api/v1/vm.info");
    }
    assert.equal(JSON.parse(info.body).state, "Running", info.body);
    floodProc = flood.spawn();
    const reader = floodProc.stdout.getReader();
    const first = new TextDecoder().decode((await reader.read()).value);
    reader.releaseLock();
    assert.match(first, /^connected \d+ refused \d+/);
    const [opened, refused] = first.match(/\d+/g)!.map(Number);
    assert.equal(opened + refused, 1100);
    // The VMM is alive with its descriptors within the limit, and answers a new client.
    const ping = await apiRequest(socket, "GET", "/api/v1/vmm.ping");
    assert.equal(ping.status, 200, ping.body);
    info = await apiRequest(socket, "GET", "/api/v1/vm.info");
    assert.equal(info.status, 200);
    assert.equal(JSON.parse(info.body).state, "Running");
    const pid = JSON.parse(ping.body).pid as number;
    const fds = [...Deno.readDirSync(`/proc/${pid}/fd`)].length;
    assert.ok(fds < 1024, `dvmm holds ${fds} descriptors`);
    console.log(`1,100 idle connections: ${opened} connected, ${refused} refused; dvmm holds ${fds} fds`);
    await floodProc.stdin.close();
    await floodProc.status;
    floodProc = null;
    assert.equal((await apiRequest(socket, "PUT", "/api/v1/vmm.shutdown")).status, 204);
    const st = await vmm.status;
    assert.equal(st.code, 0);
  } finally {
    if (floodProc) {
      try {
        await floodProc.stdin.close();
      } catch { /* closed */ }
      floodProc.kill();
      await floodProc.status;
    }
    try {
      vmm.kill();
    } catch { /* exited */ }
    await vmm.status;
    await vmm.stdout.cancel();
    await vmm.stderr.cancel();
    await Deno.remove(dir, { recursive: true });
  }
});
