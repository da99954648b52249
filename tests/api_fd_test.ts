/**
 * `--api-socket fd=N`: dvmm serves the API on a listening UNIX socket it inherits. python3 plays the
 * parent (Deno cannot hand a child an extra descriptor): it binds and listens, starts dvmm with the fd,
 * then talks HTTP to the socket path.
 */
import assert from "node:assert/strict";

const MAIN = new URL("../main.ts", import.meta.url).pathname;
const havePython = (await new Deno.Command("sh", { args: ["-c", "command -v python3"] }).output()).code === 0;

const PARENT = `
import os, socket, subprocess, sys, time
deno, main, path = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path); s.listen(16)
fd = s.fileno(); os.set_inheritable(fd, True)
child = subprocess.Popen([deno, "run", "-A", "--quiet", main, "--api-socket", f"fd={fd}"], pass_fds=[fd])
s.close()

def http(method, endpoint, raw=None):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.settimeout(10); c.connect(path)
    c.sendall(raw or f"{method} /api/v1/{endpoint} HTTP/1.1\\r\\nHost: localhost\\r\\nContent-Length: 0\\r\\n\\r\\n".encode())
    data = b""
    try:
        while True:
            chunk = c.recv(65536)
            if not chunk: break
            data += chunk
            head, _, body = data.partition(b"\\r\\n\\r\\n")
            n = [int(l.split(b":")[1]) for l in head.split(b"\\r\\n") if l.lower().startswith(b"content-length:")]
            if _ and n and len(body) >= n[0]: break
            if _ and b" 204 " in head.split(b"\\r\\n")[0]: break
    except socket.timeout:
        pass
    c.close()
    return data.decode(errors="replace")

for _ in range(200):
    try:
        r = http("GET", "vmm.ping"); break
    except (ConnectionRefusedError, FileNotFoundError, socket.timeout):
        time.sleep(0.05)
print("PING", r.split("\\r\\n")[0], r.split("\\r\\n\\r\\n", 1)[1])
print("GARBAGE", repr(http(None, None, raw=b"\\x00\\xffnot http at all\\r\\n\\r\\n")[:40]))
print("INFO", http("GET", "vm.info").split("\\r\\n")[0])
print("SHUTDOWN", http("PUT", "vmm.shutdown").split("\\r\\n")[0])
print("EXIT", child.wait(timeout=30))
`;

Deno.test({
  name: "api: --api-socket fd=N serves the API on an inherited listening socket",
  ignore: !havePython,
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-fd-" });
  try {
    const out = await new Deno.Command("python3", {
      args: ["-c", PARENT, Deno.execPath(), MAIN, `${dir}/api.sock`],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(out.stdout);
    const ctx = `\n${text}\n${new TextDecoder().decode(out.stderr)}`;
    assert.equal(out.code, 0, ctx);
    assert.match(text, /^PING HTTP\/1\.1 200 {2}/m, ctx);
    const ping = JSON.parse(text.match(/^PING HTTP\/1\.1 200 {2}(.*)$/m)![1]);
    assert.equal(typeof ping.version, "string");
    assert.match(text, /^INFO HTTP\/1\.1 404 /m, "no VM yet: 404, and the server survived the garbage");
    assert.match(text, /^SHUTDOWN HTTP\/1\.1 204 /m, ctx);
    assert.match(text, /^EXIT 0$/m, ctx);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("api: --api-socket fd=N on a descriptor that is not a listening socket is a clear error", async () => {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--quiet", MAIN, "--api-socket", "fd=97"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.notEqual(out.code, 0);
  assert.match(new TextDecoder().decode(out.stderr), /api-socket fd=97/);
});
