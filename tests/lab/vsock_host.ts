/**
 * The host side of the vsock lab test (tests/lab_vsock_test.ts), run with deno inside the lab while dvmm
 * runs a guest with `--vsock cid=3,socket=SOCKET` whose script echoes on vsock port 1024:
 *
 *   deno run -A tests/lab/vsock_host.ts SOCKET MIB CONNS KIB
 *
 * 1. serves SOCKET_1025 for the guest's own connection (reads to EOF, answers `host got: <text>`);
 * 2. waits for the guest's echo listener: `CONNECT 1024` until the answer is `OK <port>`;
 * 3. `CONNECT 4444` (nobody listens there): the socket must close without an OK;
 * 4. echoes MIB MiB of random bytes through one connection, checks them byte for byte, prints MiB/s;
 * 5. CONNS connections at once, each echoing KIB KiB of its own bytes;
 * 6. reports what SOCKET_1025 received (within 2 minutes).
 * Prints one `KEY value...` line per result; exits 1 on the first failure.
 */
const [sock, mibArg, connsArg, kibArg] = Deno.args;
const MIB = Number(mibArg ?? 64);
const CONNS = Number(connsArg ?? 32);
const KIB = Number(kibArg ?? 256);
const enc = new TextEncoder();
const dec = new TextDecoder();

function say(line: string): void {
  console.log(line);
}

function fail(why: string): never {
  console.log(`FAIL ${why}`);
  Deno.exit(1);
}

/** The guest-initiated connection: one client at SOCKET_1025. */
async function serveGuest(): Promise<void> {
  const l = Deno.listen({ transport: "unix", path: `${sock}_1025` });
  const c = await l.accept();
  const parts: Uint8Array[] = [];
  const buf = new Uint8Array(4096);
  for (;;) {
    const n = await c.read(buf);
    if (n === null) break;
    parts.push(buf.slice(0, n));
  }
  const text = dec.decode(concat(parts)).trim();
  say(`g2h-host-got ${text}`);
  await writeAll(c, enc.encode(`host got: ${text}\n`));
  c.close();
  l.close();
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

async function writeAll(c: Deno.Conn, b: Uint8Array): Promise<void> {
  for (let off = 0; off < b.length;) off += await c.write(b.subarray(off));
}

/** The hybrid handshake: `CONNECT port`, then the answer line (null when the socket closes first). */
async function hybridConnect(port: number): Promise<{ conn: Deno.UnixConn; answer: string | null }> {
  const conn = await Deno.connect({ transport: "unix", path: sock });
  await writeAll(conn, enc.encode(`CONNECT ${port}\n`));
  const one = new Uint8Array(1);
  let line = "";
  for (;;) {
    const n = await conn.read(one);
    if (n === null) return { conn, answer: null };
    if (one[0] === 10) return { conn, answer: line };
    line += String.fromCharCode(one[0]);
    if (line.length > 64) fail(`answer too long: ${line}`);
  }
}

async function connectOk(port: number): Promise<Deno.UnixConn> {
  const { conn, answer } = await hybridConnect(port);
  if (answer === null || !/^OK \d+$/.test(answer)) fail(`CONNECT ${port} answered ${answer}`);
  return conn;
}

/** Sends `data` while reading the echo; checks it. Returns seconds taken. */
async function echo(conn: Deno.UnixConn, data: Uint8Array): Promise<number> {
  const t0 = performance.now();
  const writer = (async () => {
    const chunk = 64 * 1024;
    for (let off = 0; off < data.length; off += chunk) {
      await writeAll(conn, data.subarray(off, Math.min(off + chunk, data.length)));
    }
    await conn.closeWrite();
  })();
  const reader = (async () => {
    const buf = new Uint8Array(256 * 1024);
    let got = 0;
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      if (got + n > data.length) fail(`echo: more bytes than sent (${got + n})`);
      for (let i = 0; i < n; i++) {
        if (buf[i] !== data[got + i]) fail(`echo differs at byte ${got + i}`);
      }
      got += n;
    }
    if (got !== data.length) fail(`echo ended at ${got} of ${data.length} bytes`);
  })();
  await Promise.all([writer, reader]);
  conn.close();
  return (performance.now() - t0) / 1000;
}

function random(n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let o = 0; o < n; o += 65536) crypto.getRandomValues(b.subarray(o, Math.min(o + 65536, n)));
  return b;
}

async function main(): Promise<void> {
  const guestConn = serveGuest();

  // The socket appears when dvmm boots; the guest's listener a little later (RST until then).
  const start = Date.now();
  let first: Deno.UnixConn | null = null;
  while (first === null) {
    if (Date.now() - start > 240_000) fail("the guest's echo listener never answered");
    try {
      const { conn, answer } = await hybridConnect(1024);
      if (answer !== null && /^OK \d+$/.test(answer)) {
        first = conn;
        say(`connect-ok ${answer} after ${((Date.now() - start) / 1000).toFixed(1)} s`);
      } else conn.close();
    } catch { /* no socket yet */ }
    if (first === null) await new Promise((r) => setTimeout(r, 500));
  }
  await echo(first, enc.encode("warm-up"));

  const rst = await hybridConnect(4444);
  say(`rst-closed ${rst.answer === null ? "yes" : `no: ${rst.answer}`}`);
  rst.conn.close();

  const data = random(MIB << 20);
  const secs = await echo(await connectOk(1024), data);
  say(`echo ${MIB} MiB ok ${secs.toFixed(2)} s ${(MIB / secs).toFixed(2)} MiB/s`);

  const t0 = performance.now();
  const conns = await Promise.all(Array.from({ length: CONNS }, () => connectOk(1024)));
  const payloads = conns.map(() => random(KIB << 10));
  await Promise.all(conns.map((c, i) => echo(c, payloads[i])));
  say(`many ${CONNS} x ${KIB} KiB ok ${((performance.now() - t0) / 1000).toFixed(2)} s`);

  const timeout = new Promise<"timeout">((r) => setTimeout(() => r("timeout"), 120_000));
  if (await Promise.race([guestConn, timeout]) === "timeout") say("g2h-host-got (nothing)");
  Deno.exit(0);
}

await main();
