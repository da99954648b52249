/**
 * Seccomp (`--seccomp true|false|log|errno`): the filters are really loaded on every thread of a running
 * dvmm, a call outside a thread kind's list ends the process with a message naming it (`true`), is
 * reported and carried out (`log`) or fails with EPERM (`errno`), and vCPU threads may make KVM requests
 * only. The lab tests run dvmm with the default (`true`) and so check that real guests and devices work
 * under the filters.
 */
import assert from "node:assert/strict";
import { allowList, compileFilter } from "../vmm/seccomp.ts";
import { kvmAvailable } from "./helpers/realmode.ts";
import { pvhElf } from "./helpers/tiny_guest.ts";
import { dvmmCommand, until, waitForSocket } from "./helpers/host.ts";
import { apiRequest } from "../api/client.ts";

const PROBE = new URL("./helpers/seccomp_probe.ts", import.meta.url).pathname;
const dec = new TextDecoder();

async function probe(...args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--quiet", PROBE, ...args],
    env: { DENO_NO_UPDATE_CHECK: "1" },
    stdin: "null",
  }).output();
  return {
    code: out.code,
    signal: out.signal,
    stdout: dec.decode(out.stdout),
    stderr: dec.decode(out.stderr),
  };
}

Deno.test("seccomp: filters compile to BPF within the kernel's limit, each list has what every thread needs", () => {
  for (const kind of ["vmm", "vcpu", "device", "migration"] as const) {
    const list = allowList(kind);
    assert.ok(list.includes("rt_sigreturn") && list.includes("futex") && list.includes("exit"), kind);
    assert.ok(!list.includes("execve") && !list.includes("ptrace") && !list.includes("mount"), kind);
    const prog = compileFilter(list, 0x30000);
    assert.equal(prog.length % 8, 0);
    assert.ok(prog.length / 8 < 4096, `${kind}: ${prog.length / 8} instructions`);
  }
  // Every worker kind's calls are allowed by the vmm filter it inherits.
  const vmm = new Set(allowList("vmm"));
  for (const kind of ["vcpu", "device", "migration"] as const) {
    for (const name of allowList(kind)) {
      assert.ok(vmm.has(name), `${kind}: ${name} missing from the vmm list`);
    }
  }
  assert.throws(() => compileFilter(["no_such_call"], 0), /unknown system call no_such_call/);
});

Deno.test("seccomp true: a forbidden call ends the process with a message naming it", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-seccomp-" });
  try {
    const r = await probe("true", "symlink", `${dir}/link`);
    assert.equal(r.signal, "SIGSYS", r.stderr);
    assert.match(r.stdout, /^filtered\n$/);
    assert.match(
      r.stderr,
      /dvmm: seccomp: vmm thread \d+ made system call symlink(at)? \(\d+\), which its filter forbids/,
    );
    await assert.rejects(() => Deno.lstat(`${dir}/link`), Deno.errors.NotFound);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("seccomp log: the call is reported once and carried out; errno: it fails with EPERM", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-seccomp-" });
  try {
    const log = await probe("log", "symlink", `${dir}/link`);
    assert.equal(log.code, 0, log.stderr);
    assert.equal(log.stdout, "filtered\nsymlink: made\nend\n");
    assert.match(
      log.stderr,
      /dvmm: seccomp: vmm thread \d+ made system call symlink(at)? \(\d+\), not in its allow list/,
    );
    assert.equal((await Deno.lstat(`${dir}/link`)).isSymlink, true);

    const errno = await probe("errno", "symlink", `${dir}/link2`);
    assert.equal(errno.code, 0, errno.stderr);
    assert.equal(errno.stdout, "filtered\nsymlink: PermissionDenied\nend\n");
    await assert.rejects(() => Deno.lstat(`${dir}/link2`), Deno.errors.NotFound);

    const off = await probe("false", "symlink", `${dir}/link3`);
    assert.equal(off.stdout, "filtered\nsymlink: made\nend\n");
    assert.doesNotMatch(off.stderr, /seccomp/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name: "seccomp: a vCPU thread may make KVM requests, and no others",
  ignore: !kvmAvailable(),
}, async () => {
  const log = await probe("log", "vcpu-ioctl");
  assert.equal(log.code, 0, log.stderr);
  assert.match(log.stdout, /kvm ioctl: 12\n/);
  assert.match(
    log.stderr,
    /dvmm: seccomp: vcpu thread \d+ made system call ioctl \(16, request 0x5401\), not in its allow list/,
  );
  const trap = await probe("true", "vcpu-ioctl");
  assert.equal(trap.signal, "SIGSYS", trap.stderr);
  assert.match(trap.stdout, /kvm ioctl: 12\n/);
  assert.doesNotMatch(trap.stdout, /tcgets/);
  assert.match(
    trap.stderr,
    /dvmm: seccomp: vcpu thread \d+ made system call ioctl \(16, request 0x5401\), which its filter forbids/,
  );
});

Deno.test({
  name: "seccomp: a running dvmm (default --seccomp true) has a filter on every thread, two on workers",
  ignore: !kvmAvailable(),
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-seccomp-" });
  const sock = `${dir}/api.sock`;
  await Deno.writeFile(`${dir}/spin.elf`, pvhElf(new Uint8Array([0xeb, 0xfe]))); // jmp $
  const child = dvmmCommand([
    "--api-socket",
    `path=${sock}`,
    "--kernel",
    `${dir}/spin.elf`,
    "--cpus",
    "boot=2",
    "--memory",
    "size=64M",
    "--console",
    "off",
    "--serial",
    "null",
  ]).spawn();
  try {
    await waitForSocket(sock);
    const threads = () =>
      [...Deno.readDirSync(`/proc/${child.pid}/task`)].map((t) => {
        const status = Deno.readTextFileSync(`/proc/${child.pid}/task/${t.name}/status`);
        const comm = Deno.readTextFileSync(`/proc/${child.pid}/task/${t.name}/comm`).trim();
        const mode = Number(/^Seccomp:\s+(\d+)/m.exec(status)![1]);
        const filters = Number(/^Seccomp_filters:\s+(\d+)/m.exec(status)?.[1] ?? -1);
        return { comm, mode, filters };
      });
    // The device workers start once the vCPUs run: wait for the rng's too.
    await until(
      "two vCPU threads and the rng's worker with their filters",
      () => threads().filter((t) => /^vcpu\d$|^__rng$/.test(t.comm) && t.filters === 2).length === 3,
      20_000,
    );
    const all = threads();
    for (const t of all) assert.equal(t.mode, 2, `${t.comm} has no seccomp filter`);
    for (const t of all.filter((t) => /^vcpu\d$|^__rng$/.test(t.comm))) assert.equal(t.filters, 2, t.comm);
    assert.ok(all.some((t) => t.comm === "__rng"), all.map((t) => t.comm).join(","));
    // The VM still answers, and its API still works through the filters.
    const info = await apiRequest(sock, "GET", "/api/v1/vm.info");
    assert.equal(info.status, 200);
    assert.equal(JSON.parse(info.body).state, "Running");
  } finally {
    child.kill("SIGTERM");
    const out = await child.output();
    assert.equal(out.code, 0, dec.decode(out.stderr));
    assert.doesNotMatch(dec.decode(out.stderr), /seccomp/);
    await Deno.remove(dir, { recursive: true });
  }
});
