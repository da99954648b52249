/** The real `main.ts` as a subprocess: option errors, the API lifetime, the socket file, events. */
import assert from "node:assert/strict";
import { CLI_OPTIONS, CliError, DEFAULT_LOG_FORMAT, logFormatProblem, parseCli } from "../main.ts";
import { kvmAvailable } from "./helpers/realmode.ts";
import { pvhElf } from "./helpers/tiny_guest.ts";
import { dvmmCommand } from "./helpers/host.ts";
import { apiRequest } from "../api/client.ts";

const dec = new TextDecoder();

async function run(args: string[]) {
  const out = await dvmmCommand(args).output();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

async function waitFor(path: string, ms = 20000): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    try {
      if ((await Deno.lstat(path)).isSocket) return;
    } catch { /* not yet */ }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${path} did not appear`);
}

Deno.test("cli: --version and --help", async () => {
  const v = await run(["--version"]);
  assert.equal(v.code, 0);
  assert.match(v.stdout, /^dvmm v\d+\.\d+\.\d+/);
  const h = await run(["--help"]);
  assert.equal(h.code, 0);
  assert.match(h.stdout, /--api-socket/);
  for (const o of Object.keys(CLI_OPTIONS).filter((o) => o !== "v")) {
    assert.match(h.stdout, new RegExp(`--${o}\\b`), o);
  }
  // No arguments at all: the help, as Cloud Hypervisor (clap's arg_required_else_help).
  const none = await run([]);
  assert.equal(none.code, 2);
  assert.match(none.stderr, /usage: dvmm/);
});

Deno.test("cli: bad options exit non-zero with a message naming the option", async () => {
  const cases: [string[], RegExp][] = [
    [["--bogus"], /unexpected argument '--bogus' found/],
    [["--kernel", "/k", "--cpus", "boot=4,max=2"], /--cpus: .*must not exceed max_vcpus/],
    [["--kernel", "/k", "--memory", "size=lots"], /--memory: size: 'lots' is not a size/],
    [["--kernel", "/k", "--disk", "path=/a,colour=red"], /--disk: unknown parameter 'colour'/],
    [["--kernel", "/k", "--net", "tap=tap0,mac=nope"], /--net: mac: 'nope' is not a MAC address/],
    [["--kernel", "/k", "--serial", "loud"], /--serial: unknown parameter 'loud'/],
    [["--kernel", "/k", "--cpus", "boot=1", "--cpus", "boot=2"], /'--cpus' cannot be used multiple times/],
    [["--kernel", "/k", "--igvm", "/x.igvm"], /--igvm: not built in dvmm/],
    [["--seccomp", "maybe"], /invalid value 'maybe' for '--seccomp/],
    [["--log-format", "{nope}"], /--log-format: unknown format token '\{nope\}'/],
    [["--log-format", "{msg}"], /--log-format: dvmm cannot change its log line format/],
    [["--restore", "prefault=on"], /--restore: source_url is required/],
    [
      ["--restore", "source_url=file:///nonexistent"],
      /cannot restore the VM: cannot read the snapshot in \/nonexistent/,
    ],
    [["--dbus-service-name", "org.example.Vmm"], /--dbus-service-name needs --dbus-object-path/],
    [["--cpus", "boot=2"], /--kernel \(or --firmware\) is required/],
    [["-v"], /nothing to do/],
    [["--api-socket", "fd=x"], /--api-socket: fd must be a file descriptor number/],
    [["--api-socket", "fd=97"], /--api-socket fd=97: not an open, listening socket/],
    [["--api-socket", "/tmp/x.sock", "extra"], /unexpected argument 'extra'/],
  ];
  for (const [args, re] of cases) {
    const r = await run(args);
    assert.notEqual(r.code, 0, `${args.join(" ")} should fail`);
    assert.match(r.stderr, re, `${args.join(" ")}: ${r.stderr}`);
  }
});

Deno.test("cli: a VM that cannot boot makes dvmm exit non-zero", async () => {
  const r = await run(["--kernel", "/nonexistent/vmlinux", "--serial", "null", "--console", "off"]);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /cannot boot the VM/);
});

Deno.test("cli: API-only dvmm serves until vmm.shutdown, then exits 0 and removes its socket", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-cli-" });
  const sock = `${dir}/api.sock`;
  const eventsFile = `${dir}/events.json`;
  const child = dvmmCommand(["--api-socket", `path=${sock}`, "--event-monitor", `path=${eventsFile}`])
    .spawn();
  try {
    await waitFor(sock);
    assert.equal((await Deno.stat(sock)).mode! & 0o777, 0o600);

    // A second dvmm on the same live socket is refused.
    const second = await run(["--api-socket", `path=${sock}`]);
    assert.equal(second.code, 1);
    assert.match(second.stderr, /in use by another process/);

    const remote = (args: string[]) => run(["remote", "--api-socket", sock, ...args]);
    const ping = await remote(["ping"]);
    assert.equal(ping.code, 0, ping.stderr);
    assert.equal(JSON.parse(ping.stdout).pid, child.pid);

    const boot = await remote(["boot"]);
    assert.equal(boot.code, 1);
    assert.match(boot.stderr, /vm\.boot failed \(HTTP 404\): the VM is not created/);

    const bye = await remote(["shutdown-vmm"]);
    assert.equal(bye.code, 0, bye.stderr);
    const status = await child.status;
    assert.equal(status.code, 0);
    await assert.rejects(() => Deno.lstat(sock), Deno.errors.NotFound);

    const lines = (await Deno.readTextFile(eventsFile)).trim().split("\n").map((l) => JSON.parse(l));
    assert.deepEqual(lines.map((e) => `${e.source}:${e.event}`), ["vmm:starting", "vmm:shutdown"]);
    for (const e of lines) {
      assert.ok(Number.isInteger(e.timestamp.secs) && Number.isInteger(e.timestamp.nanos));
      assert.equal(e.properties, null);
    }
  } finally {
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
    await child.output().catch(() => {});
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("cli: SIGTERM shuts dvmm down cleanly", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-cli-" });
  const sock = `${dir}/api.sock`;
  const child = dvmmCommand(["--api-socket", `path=${sock}`]).spawn();
  try {
    await waitFor(sock);
    child.kill("SIGTERM");
    const out = await child.output();
    assert.equal(out.code, 0, dec.decode(out.stderr));
    await assert.rejects(() => Deno.lstat(sock), Deno.errors.NotFound);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

for (const how of ["SIGINT", "vmm.shutdown"] as const) {
  Deno.test(`cli: ${how} while a migration waits for its sender cancels it; dvmm ends cleanly`, async () => {
    const dir = await Deno.makeTempDir({ prefix: "dvmm-cli-" });
    const sock = `${dir}/api.sock`;
    const mig = `${dir}/mig.sock`;
    const child = dvmmCommand(["--api-socket", `path=${sock}`]).spawn();
    try {
      await waitFor(sock);
      // No sender ever comes: the request would wait for ever.
      const receiving = apiRequest(sock, "PUT", "/api/v1/vm.receive-migration", {
        receiver_url: `unix:${mig}`,
      });
      await waitFor(mig);
      assert.equal((await apiRequest(sock, "GET", "/api/v1/vmm.ping")).status, 200);
      if (how === "SIGINT") child.kill("SIGINT");
      else assert.equal((await apiRequest(sock, "PUT", "/api/v1/vmm.shutdown")).status, 204);
      const r = await receiving;
      assert.equal(r.status, 500);
      assert.match(r.body, /the VM migration could not be received.*cancelled: the VMM is shutting down/s);
      const out = await child.output();
      assert.equal(out.code, 0, dec.decode(out.stderr));
      await assert.rejects(() => Deno.lstat(sock), Deno.errors.NotFound);
    } finally {
      try {
        child.kill("SIGKILL");
      } catch { /* ended */ }
      await child.output().catch(() => {});
      await Deno.remove(dir, { recursive: true });
    }
  });
}

Deno.test({
  name: "cli: SIGTERM during a boot ends dvmm cleanly once the boot step is over",
  ignore: !kvmAvailable(),
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-cli-" });
  const sock = `${dir}/api.sock`;
  const events = `${dir}/events.json`;
  await Deno.writeFile(`${dir}/spin.elf`, pvhElf(new Uint8Array([0xeb, 0xfe]))); // jmp $
  // 1 GiB prefaulted: the boot takes a moment, and the signal arrives in it.
  const child = dvmmCommand([
    "--api-socket",
    `path=${sock}`,
    "--event-monitor",
    `path=${events}`,
    "--kernel",
    `${dir}/spin.elf`,
    "--memory",
    "size=1G,prefault=on",
    "--console",
    "off",
    "--serial",
    "null",
  ]).spawn();
  try {
    const booting = async () => {
      try {
        return (await Deno.readTextFile(events)).includes('"booting"');
      } catch {
        return false;
      }
    };
    for (let i = 0; i < 400 && !(await booting()); i++) await new Promise((r) => setTimeout(r, 5));
    child.kill("SIGTERM");
    const out = await child.output();
    assert.equal(out.code, 0, dec.decode(out.stderr));
    await assert.rejects(() => Deno.lstat(sock), Deno.errors.NotFound);
    const seen = (await Deno.readTextFile(events)).trim().split("\n").map((l) => JSON.parse(l).event);
    assert.ok(seen.includes("booting"), seen.join(","));
    assert.equal(seen.at(-1), "shutdown", seen.join(","));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name: "cli: SIGTERM while a VM runs stops the guest and exits cleanly",
  ignore: !kvmAvailable(),
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-cli-" });
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
  ]).spawn();
  try {
    await waitFor(sock);
    // Running: both vCPU threads exist.
    let names: string[] = [];
    for (let i = 0; i < 100 && names.filter((n) => n.startsWith("vcpu")).length < 2; i++) {
      await new Promise((r) => setTimeout(r, 50));
      names = [...Deno.readDirSync(`/proc/${child.pid}/task`)].map((t) =>
        Deno.readTextFileSync(`/proc/${child.pid}/task/${t.name}/comm`).trim()
      );
    }
    assert.ok(names.includes("vcpu0") && names.includes("vcpu1"), names.join(","));
    child.kill("SIGTERM");
    const out = await child.output();
    assert.equal(out.code, 0, dec.decode(out.stderr));
    await assert.rejects(() => Deno.lstat(sock), Deno.errors.NotFound);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name:
    "cli: a running dvmm answers Kata's no-op vm.resize 204; a second dvmm on its writable disk is refused",
  ignore: !kvmAvailable(),
}, async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-cli-" });
  const sock = `${dir}/api.sock`;
  await Deno.writeFile(`${dir}/spin.elf`, pvhElf(new Uint8Array([0xeb, 0xfe]))); // jmp $
  await Deno.writeFile(`${dir}/disk.img`, new Uint8Array(1 << 20));
  const vm = (disk: string) => [
    "--kernel",
    `${dir}/spin.elf`,
    "--memory",
    "size=64M",
    "--console",
    "off",
    "--serial",
    "null",
    "--disk",
    disk,
  ];
  const first = dvmmCommand(["--api-socket", `path=${sock}`, ...vm(`path=${dir}/disk.img`)]).spawn();
  try {
    await waitFor(sock);
    const info = async () => JSON.parse((await apiRequest(sock, "GET", "/api/v1/vm.info")).body);
    for (let i = 0; i < 200 && (await info()).state !== "Running"; i++) {
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal((await info()).state, "Running");
    // Kata sends vm.resize with the VM's current sizes on every container create and update.
    const noop = { desired_vcpus: 1, desired_ram: 64 << 20, desired_balloon: null };
    assert.equal((await apiRequest(sock, "PUT", "/api/v1/vm.resize", noop)).status, 204);
    const tooMany = await apiRequest(sock, "PUT", "/api/v1/vm.resize", { desired_vcpus: 2 });
    assert.equal(tooMany.status, 400);
    assert.match(tooMany.body, /desired_vcpus/);
    for (const disk of [`path=${dir}/disk.img`, `path=${dir}/disk.img,readonly=on`]) {
      const second = await run(vm(disk));
      assert.equal(second.code, 1, disk);
      assert.match(second.stderr, /disk\.img.*locked by another process/s, disk);
    }
    assert.equal((await info()).state, "Running");
    first.kill("SIGTERM");
    assert.equal((await first.output()).code, 0);
    // Once the first has gone, the image is free.
    const third = dvmmCommand(["--api-socket", `path=${sock}`, ...vm(`path=${dir}/disk.img`)]).spawn();
    await waitFor(sock);
    third.kill("SIGTERM");
    assert.equal((await third.output()).code, 0);
  } finally {
    try {
      first.kill("SIGKILL");
    } catch { /* ended */ }
    await first.output().catch(() => {});
    await Deno.remove(dir, { recursive: true });
  }
});

// ---------------------------------------------------------------------------------------------------
// argv, read in-process

function cliError(argv: string[]): CliError {
  try {
    parseCli(argv);
  } catch (e) {
    if (e instanceof CliError) return e;
    throw e;
  }
  throw new Error(`${argv.join(" ")} should fail`);
}

Deno.test("cli argv: repeatable options take one or more values per occurrence", () => {
  const c = parseCli(["--kernel", "/k", "--disk", "path=a", "path=b", "--disk", "path=c", "--net", "tap=t0"]);
  assert.deepEqual(c.vm?.disk, ["path=a", "path=b", "path=c"]);
  assert.deepEqual(c.vm?.net, ["tap=t0"]);
  assert.deepEqual(parseCli(["--kernel", "/k", "--disk=path=a", "--disk", "path=b"]).vm?.disk, [
    "path=a",
    "path=b",
  ]);
  // An attached value ends the option's values (as clap).
  assert.match(
    cliError(["--kernel", "/k", "--disk=path=a", "path=b"]).message,
    /unexpected argument 'path=b'/,
  );
  assert.match(
    cliError(["--kernel", "/k", "--disk", "--net", "tap=t0"]).message,
    /a value is required for '--disk/,
  );
});

Deno.test("cli argv: single-value options and flags may be given once", () => {
  const c = parseCli(["--kernel=/k", "--cpus=boot=2", "--memory", "size=1G", "--pvpanic", "--watchdog"]);
  assert.equal(c.vm?.kernel, "/k");
  assert.equal(c.vm?.cpus, "boot=2");
  assert.equal(c.vm?.memory, "size=1G");
  assert.equal(c.vm?.pvpanic, true);
  assert.equal(c.vm?.watchdog, true);
  assert.match(
    cliError(["--kernel", "/k", "--kernel", "/j"]).message,
    /'--kernel' cannot be used multiple times/,
  );
  assert.match(cliError(["--kernel", "/k", "--pvpanic", "--pvpanic"]).message, /'--pvpanic' cannot be used/);
  assert.match(cliError(["--kernel", "/k", "--pvpanic=on"]).message, /unexpected value 'on' for '--pvpanic'/);
  assert.match(cliError(["--kernel"]).message, /a value is required for '--kernel/);
  assert.match(cliError(["--kernel", "/k", "--cmdline", "-x"]).message, /--cmdline=-x/);
  assert.equal(parseCli(["--kernel", "/k", "--cmdline=-x"]).vm?.cmdline, "-x");
  assert.equal(parseCli(["--kernel", "/k", "--cmdline", ""]).vm?.cmdline, "");
  assert.match(cliError(["--kernel", "/k", "stray"]).message, /unexpected argument 'stray' found/);
  assert.match(cliError(["--Kernel", "/k"]).message, /unexpected argument '--Kernel' found/);
  assert.match(cliError(["--kern", "/k"]).message, /unexpected argument '--kern' found/);
  assert.match(cliError(["--toString", "x"]).message, /unexpected argument '--toString' found/);
});

Deno.test("cli argv: --rtc with or without a value, -v counts, -h/-V", () => {
  assert.equal(parseCli(["--kernel", "/k", "--rtc"]).vm?.rtc, "");
  assert.equal(parseCli(["--kernel", "/k", "--rtc", "--pvpanic"]).vm?.rtc, "");
  assert.equal(parseCli(["--kernel", "/k", "--rtc", "iommu=on"]).vm?.rtc, "iommu=on");
  assert.equal(parseCli(["--kernel", "/k", "--rtc=id=r"]).vm?.rtc, "id=r");
  assert.equal(parseCli(["-vvv", "--api-socket", "/s"]).verbosity, 3);
  assert.equal(parseCli(["-v", "-v", "--api-socket", "/s"]).verbosity, 2);
  assert.match(cliError(["--v"]).message, /unexpected argument '--v'/);
  assert.equal(parseCli(["-V"]).version, true);
  assert.equal(parseCli(["--version"]).version, true);
  assert.equal(parseCli(["-h"]).help, true);
  assert.equal(parseCli(["--kernel", "/k", "--help", "--bogus"]).help, true);
  assert.match(cliError(["-x"]).message, /unexpected argument '-x'/);
});

Deno.test("cli argv: VM options need a payload; VMM options do not", () => {
  for (const argv of [["--cpus", "boot=2"], ["--pvpanic"], ["--rtc"], ["--disk", "path=a"], ["--landlock"]]) {
    const e = cliError(["--api-socket", "/s", ...argv]);
    assert.match(e.message, /needs a payload: --kernel \(or --firmware\) is required/, argv.join(" "));
    assert.equal(e.code, 2);
  }
  const c = parseCli([
    "--api-socket",
    "path=/s",
    "--event-monitor",
    "path=/e",
    "--restore",
    "source_url=file:///x",
    "--no-shutdown",
    "--seccomp",
    "log",
    "--log-file",
    "/l",
    "--dbus-service-name",
    "org.example.Vmm",
    "--dbus-object-path",
    "/org/example/Vmm",
    "--dbus-system-bus",
  ]);
  assert.equal(c.vm, null);
  assert.equal(c.apiSocket, "path=/s");
  assert.equal(c.eventMonitor, "path=/e");
  assert.equal(c.restore, "source_url=file:///x");
  assert.equal(c.noShutdown, true);
  assert.equal(c.seccomp, "log");
  assert.equal(c.logFile, "/l");
  assert.deepEqual([c.dbusServiceName, c.dbusObjectPath, c.dbusSystemBus], [
    "org.example.Vmm",
    "/org/example/Vmm",
    true,
  ]);
  assert.equal(parseCli(["--firmware", "/fw", "--cpus", "boot=2"]).vm?.firmware, "/fw");
});

Deno.test("cli argv: every option is accepted; those CH's release build lacks are refused by name", () => {
  const sample: Record<string, string[]> = {
    "many": ["x=1", "y=2"],
    "one": ["x=1"],
    "optional": [],
    "flag": [],
    "count": [],
  };
  const notBuilt = Object.entries(CLI_OPTIONS).filter(([, s]) => s.notBuilt).map(([n]) => n).sort();
  assert.deepEqual(notBuilt, ["fw-cfg-config", "gdb", "host-data", "igvm", "ivshmem", "pvmemcontrol"]);
  for (const [name, spec] of Object.entries(CLI_OPTIONS)) {
    if (name === "help" || name === "version" || name === "kernel") continue;
    const flag = spec.shortOnly ? `-${spec.short}` : `--${name}`;
    const value = name === "seccomp" ? ["true"] : sample[spec.arity];
    const argv = ["--kernel", "/k", flag, ...value];
    if (spec.notBuilt) {
      const e = cliError(argv);
      assert.match(e.message, new RegExp(`^--${name}: not built in dvmm`), name);
      assert.equal(e.code, 1);
    } else {
      parseCli(argv);
    }
  }
  assert.equal(parseCli(["--kernel", "/k", "--seccomp", "errno"]).seccomp, "errno");
});

Deno.test("cli argv: --log-format is checked with Cloud Hypervisor's token grammar", () => {
  assert.equal(logFormatProblem(DEFAULT_LOG_FORMAT), null);
  assert.match(logFormatProblem("{msg")!, /unterminated/);
  assert.match(logFormatProblem("msg}")!, /unmatched/);
  assert.match(logFormatProblem("{bogus}")!, /unknown format token/);
  assert.match(
    logFormatProblem("{{literal}} {localhour}:{minute} {msg}")!,
    /cannot change its log line format/,
  );
});
