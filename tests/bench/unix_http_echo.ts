/**
 * The API bench's baseline: the least an HTTP server on a UNIX socket can do, in Deno. It answers every
 * request with Cloud Hypervisor's framing and vmm.ping's body size, from one read per request (keep-alive
 * and one-shot connections alike). `deno run -A tests/bench/unix_http_echo.ts SOCKET`.
 */
const [path] = Deno.args;
const body = new TextEncoder().encode('{"build_version":"v0.1.0","version":"v0.1.0","pid":1,"features":[]}');
const reply = new Uint8Array([
  ...new TextEncoder().encode(
    `HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n` +
      `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n`,
  ),
  ...body,
]);
const listener = Deno.listen({ transport: "unix", path });
for await (const conn of listener) {
  (async () => {
    const buf = new Uint8Array(65536);
    let have = "";
    try {
      for (;;) {
        const n = await conn.read(buf);
        if (n === null) break;
        have += new TextDecoder().decode(buf.subarray(0, n));
        // Requests without a body (GET): each ends at the blank line.
        let end: number;
        while ((end = have.indexOf("\r\n\r\n")) >= 0) {
          have = have.slice(end + 4);
          await conn.write(reply);
        }
      }
    } catch { /* the client went away */ }
    try {
      conn.close();
    } catch { /* closed */ }
  })();
}
