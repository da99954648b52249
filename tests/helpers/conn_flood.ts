/**
 * Opens N connections to a UNIX socket and keeps them (idle) until stdin closes; prints "connected N"
 * once done (connections the server closes meanwhile count as opened). Run with a raised descriptor
 * limit: `bash -c 'ulimit -n 4096; exec deno run -A conn_flood.ts SOCKET N'`.
 */
const [path, count] = [Deno.args[0], Number(Deno.args[1])];
const conns: Deno.Conn[] = [];
let refused = 0;
for (let i = 0; i < count; i++) {
  try {
    conns.push(await Deno.connect({ transport: "unix", path }));
  } catch {
    refused++;
  }
}
console.log(`connected ${conns.length} refused ${refused}`);
for await (const _ of Deno.stdin.readable) { /* until stdin closes */ }
for (const c of conns) {
  try {
    c.close();
  } catch { /* closed by the server */ }
}
