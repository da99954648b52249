import assert from "node:assert/strict";
import { runRemote } from "../api/remote.ts";
import { EXAMPLE_VM, startTestServer } from "../api/testing.ts";

function io(stdin = "") {
  const out: string[] = [];
  const err: string[] = [];
  return {
    out,
    err,
    io: {
      out: (t: string) => out.push(t),
      err: (t: string) => err.push(t),
      readStdin: () => Promise.resolve(stdin),
    },
  };
}

Deno.test("remote: every command reaches its endpoint", async () => {
  const t = await startTestServer();
  const dir = await Deno.makeTempDir();
  try {
    const r = async (args: string[], stdin = "") => {
      const c = io(stdin);
      const code = await runRemote(["--api-socket", t.socket, ...args], c.io);
      return { code, out: c.out.join("\n"), err: c.err.join("\n") };
    };
    const ping = await r(["ping"]);
    assert.equal(ping.code, 0);
    assert.equal(JSON.parse(ping.out).pid, Deno.pid);

    await Deno.writeTextFile(`${dir}/vm.json`, JSON.stringify(EXAMPLE_VM));
    assert.equal((await r(["create", `${dir}/vm.json`])).code, 0);
    assert.equal((await r(["create", "-"], JSON.stringify(EXAMPLE_VM))).code, 1); // already created
    assert.equal((await r(["add-disk", "path=/tmp/extra.img,id=extra"])).code, 0);
    const dup = await r(["add-disk", "path=/tmp/other.img,id=extra"]);
    assert.equal(dup.code, 1);
    assert.match(dup.err, /HTTP 409/);
    assert.equal((await r(["remove-device", "extra"])).code, 0);
    assert.equal((await r(["resize", "--cpus", "2", "--memory", "1G"])).code, 0);
    const info = await r(["info"]);
    assert.equal(JSON.parse(info.out).config.cpus.boot_vcpus, 2);
    assert.equal(JSON.parse(info.out).config.memory.size, 1 << 30);

    for (const cmd of ["boot", "pause", "resume", "power-button", "nmi", "reboot"]) {
      const x = await r([cmd]);
      assert.equal(x.code, 0, `${cmd}: ${x.err}`);
    }
    assert.equal(JSON.parse((await r(["counters"])).out)._disk0.read_bytes, 0);

    const notYet: [string[], RegExp][] = [
      [["add-net", "tap=tap1"], /HTTP 500.*not implemented/],
      [["add-fs", "tag=t,socket=/s"], /HTTP 400.*needs shared memory/],
      [["add-pmem", "file=/p"], /HTTP 500/],
      [["add-vsock", "cid=3,socket=/v"], /HTTP 500/],
      [["add-device", "path=/sys/bus/pci/devices/0000:00:01.0"], /HTTP 500/],
      [["add-user-device", "socket=/u"], /HTTP 400.*needs shared memory/],
      [["add-vdpa", "path=/dev/vhost-vdpa-0"], /HTTP 500/],
      [["resize-zone", "--id", "z", "--size", "1G"], /HTTP 404/],
      [["resize-disk", "--disk", "d", "--size", "1G"], /HTTP 404/],
      [["snapshot", "file:///tmp/snap"], /HTTP 405/],
      [["coredump", "file:///tmp/core"], /HTTP 405/],
      [["restore", "source_url=file:///tmp/snap"], /HTTP 404/],
      [["send-migration", "unix:/tmp/mig"], /HTTP 500.*not implemented/],
      [["receive-migration", "unix:/tmp/mig"], /HTTP 405/],
    ];
    for (const [args, re] of notYet) {
      const x = await r(args);
      assert.equal(x.code, 1, args.join(" "));
      assert.match(x.err, re, `${args.join(" ")}: ${x.err}`);
    }
    assert.equal((await r(["shutdown"])).code, 0);
    assert.equal((await r(["delete"])).code, 0);

    // Usage errors never reach the server.
    const usage: [string[], RegExp][] = [
      [["frobnicate"], /unknown command 'frobnicate'/],
      [["add-disk"], /exactly one argument/],
      [["add-disk", "path=/a,speed=fast"], /add-disk: unknown parameter 'speed'/],
      [["resize"], /give --cpus, --memory or --balloon/],
      [["resize", "--memory", "big"], /--memory: 'big' is not a size/],
      [["ping", "extra"], /takes no arguments/],
    ];
    for (const [args, re] of usage) {
      const x = await r(args);
      assert.equal(x.code, 2, args.join(" "));
      assert.match(x.err, re);
    }
    assert.equal((await r(["shutdown-vmm"])).code, 0);
    assert.equal(await t.loop.exited, 0);
  } finally {
    await t.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("remote: a missing socket or server is a clear error", async () => {
  const c = io();
  assert.equal(await runRemote(["ping"], c.io), 2);
  assert.match(c.err.join(""), /--api-socket PATH is required/);
  const d = io();
  assert.equal(await runRemote(["--api-socket", "/nonexistent/dvmm.sock", "ping"], d.io), 1);
  assert.match(d.err.join(""), /cannot reach the API at \/nonexistent\/dvmm\.sock/);
});
