/**
 * Landlock (`--landlock`, `--landlock-rules`, `landlock_enable`): a running dvmm with Landlock on reaches
 * only the files its config names plus the rules given; its VM runs and its API works, a write outside
 * the rules fails with EACCES (the VMM and guest go on), and a rule path that does not exist is refused.
 */
import assert from "node:assert/strict";
import { dirname, landlockAbi, landlockRules } from "../vmm/landlock.ts";
import { VmConfigSchema } from "../vmm/vm_config.ts";
import { kvmAvailable } from "./helpers/realmode.ts";
import { pvhElf } from "./helpers/tiny_guest.ts";
import { dvmmCommand, waitForSocket } from "./helpers/host.ts";
import { apiRequest, errorMessages } from "../api/client.ts";

const dec = new TextDecoder();
const ignore = !kvmAvailable() || landlockAbi() === 0;

Deno.test("landlock: the rules a config needs, with Cloud Hypervisor's access per option", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-landlock-" });
  try {
    for (const f of ["vmlinux", "initrd", "ro.img", "rw.img", "pmem.img"]) {
      await Deno.writeFile(`${dir}/${f}`, new Uint8Array(0));
    }
    const cfg = VmConfigSchema.parse({
      payload: { kernel: `${dir}/vmlinux`, initramfs: `${dir}/initrd` },
      disks: [{ path: `${dir}/ro.img`, readonly: true }, { path: `${dir}/rw.img` }],
      pmem: [{ file: `${dir}/pmem.img`, discard_writes: true }],
      vsock: { cid: 3, socket: `${dir}/vsock.sock` },
      serial: { mode: "Null" },
      console: { mode: "Off" },
      landlock_enable: true,
      landlock_rules: [{ path: "/tmp", access: "w" }],
    });
    const rules = new Map(landlockRules(cfg).map((r) => [r.path, r.access]));
    assert.equal(rules.get(`${dir}/vmlinux`), "r");
    assert.equal(rules.get(`${dir}/initrd`), "r");
    assert.equal(rules.get(`${dir}/ro.img`), "r");
    assert.equal(rules.get(`${dir}/rw.img`), "rw");
    assert.equal(rules.get(`${dir}/pmem.img`), "r");
    assert.equal(rules.get(dir), "rw", "the vsock socket's directory");
    assert.equal(rules.get("/tmp"), "w");
    assert.equal(rules.get("/dev/kvm"), "rw");
    assert.equal(rules.get("/dev/urandom"), "r");
    assert.ok(![...rules.keys()].includes("/"), "never the whole file system");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

function dvmm(dir: string, extra: string[]) {
  const sock = `${dir}/api.sock`;
  const child = dvmmCommand([
    "--api-socket",
    `path=${sock}`,
    "--kernel",
    `${dir}/spin.elf`,
    "--cpus",
    "boot=1",
    "--memory",
    "size=64M",
    "--console",
    "off",
    "--serial",
    "null",
    "--landlock",
    ...extra,
  ]).spawn();
  return { child, sock };
}

Deno.test(
  { name: "landlock: the VMM reaches the rules' paths and nothing else; the VM goes on", ignore },
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "dvmm-landlock-" });
    await Deno.mkdir(`${dir}/allowed`);
    await Deno.mkdir(`${dir}/other`);
    await Deno.writeFile(`${dir}/spin.elf`, pvhElf(new Uint8Array([0xeb, 0xfe]))); // jmp $
    const { child, sock } = dvmm(dir, ["--landlock-rules", `path=${dir}/allowed,access=rw`]);
    try {
      assert.ok(await waitForSocket(sock, 20_000));
      const api = (path: string, body?: unknown) => apiRequest(sock, "PUT", `/api/v1/${path}`, body);
      for (let i = 0; i < 100; i++) {
        const info = await apiRequest(sock, "GET", "/api/v1/vm.info");
        if (info.status === 200 && JSON.parse(info.body).state === "Running") break;
        await new Promise((r) => setTimeout(r, 100));
      }
      assert.equal((await api("vm.pause")).status, 204);
      const ok = await api("vm.coredump", { destination_url: `file://${dir}/allowed/core` });
      assert.equal(ok.status, 204, ok.body);
      assert.ok((await Deno.stat(`${dir}/allowed/core`)).size > 64 << 20);
      const denied = await api("vm.coredump", { destination_url: `file://${dir}/other/core` });
      assert.equal(denied.status, 500);
      assert.match(errorMessages(denied).join("\n"), /EACCES/);
      await assert.rejects(() => Deno.stat(`${dir}/other/core`), Deno.errors.NotFound);
      assert.equal((await api("vm.resume")).status, 204);
      const info = await apiRequest(sock, "GET", "/api/v1/vm.info");
      assert.equal(JSON.parse(info.body).state, "Running");
      assert.equal(JSON.parse(info.body).config.landlock_enable, true);
    } finally {
      child.kill("SIGTERM");
      const out = await child.output();
      assert.equal(out.code, 0, dec.decode(out.stderr));
      await Deno.remove(dir, { recursive: true });
    }
  },
);

Deno.test(
  { name: "landlock: a rule path that does not exist fails the boot, naming the option", ignore },
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "dvmm-landlock-" });
    await Deno.writeFile(`${dir}/spin.elf`, pvhElf(new Uint8Array([0xeb, 0xfe])));
    try {
      const { child } = dvmm(dir, ["--landlock-rules", `path=${dir}/missing,access=r`]);
      const out = await child.output();
      assert.notEqual(out.code, 0);
      assert.match(dec.decode(out.stderr), /--landlock-rules: Landlock cannot open .*missing/);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

Deno.test("landlock: dirname gives a socket's directory as dirname(1) does", () => {
  const cases: [string, string][] = [
    ["/run/kata/vm.sock", "/run/kata"],
    ["/a/b/", "/a"],
    ["vm.sock", "."],
    ["/vm.sock", "/"],
    ["/", "/"],
    ["", "."],
    ["a/b", "a"],
    ["/a//b//", "/a"],
  ];
  for (const [path, dir] of cases) assert.equal(dirname(path), dir, path);
});
