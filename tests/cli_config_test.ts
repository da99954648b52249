import assert from "node:assert/strict";
import {
  ConfigError,
  consoleFromOption,
  parseDiskConfig,
  parseNetConfig,
  parseRestoreConfig,
  parseSize,
  splitOptionString,
  vmConfigFromCli,
} from "../vmm/config.ts";
import { parseApiSocketOption } from "../api/server.ts";
import { parseEventMonitorOption } from "../vmm/events.ts";

Deno.test("cli config: sizes, booleans and option strings", () => {
  assert.equal(parseSize("512M"), 512 << 20);
  assert.equal(parseSize("1G"), 1 << 30);
  assert.equal(parseSize("4K"), 4096);
  assert.equal(parseSize("4096"), 4096);
  assert.throws(() => parseSize("12X"), /not a size/);
  assert.throws(() => parseSize("-1M"), /not a size/);
  assert.deepEqual(splitOptionString("tap=t0,fd=[3,4],ip=1.2.3.4"), ["tap=t0", "fd=[3,4]", "ip=1.2.3.4"]);
  assert.throws(() => splitOptionString("fd=[3,4"), /unbalanced/);
});

Deno.test("cli config: defaults follow Cloud Hypervisor", () => {
  const c = vmConfigFromCli({ kernel: "/k" });
  assert.equal(c.cpus.boot_vcpus, 1);
  assert.equal(c.cpus.max_vcpus, 1);
  assert.equal(c.memory.size, 512 << 20);
  assert.equal(c.serial.mode, "Null");
  assert.equal(c.console.mode, "Tty");
  assert.equal(c.rng.src, "/dev/urandom");
  assert.equal(c.payload.kernel, "/k");
});

Deno.test("cli config: a full command line", () => {
  const c = vmConfigFromCli({
    kernel: "/boot/vmlinux",
    initramfs: "/boot/initrd",
    cmdline: "console=ttyS0 root=/dev/vda1",
    cpus: "boot=2,max=4",
    memory: "size=1G,shared=on,hugepages=on",
    serial: "tty",
    console: "off",
    disk: [
      "path=/img/a.raw,readonly=on,direct=on,id=root,num_queues=2,queue_size=256,serial=ABC",
      "path=/img/b.raw",
    ],
    net: ["tap=tap0,ip=192.168.1.1,mask=255.255.255.0,mac=12:34:56:78:90:ab,num_queues=4,queue_size=512"],
    rng: "src=/dev/random",
  });
  assert.deepEqual([c.cpus.boot_vcpus, c.cpus.max_vcpus], [2, 4]);
  assert.equal(c.memory.size, 1 << 30);
  assert.ok(c.memory.shared && c.memory.hugepages);
  assert.equal(c.payload.initramfs, "/boot/initrd");
  assert.equal(c.serial.mode, "Tty");
  assert.equal(c.console.mode, "Off");
  assert.equal(c.disks!.length, 2);
  assert.deepEqual(
    [c.disks![0].readonly, c.disks![0].direct, c.disks![0].id, c.disks![0].num_queues, c.disks![0].serial],
    [true, true, "root", 2, "ABC"],
  );
  assert.equal(c.disks![1].queue_size, 128);
  assert.equal(c.net![0].tap, "tap0");
  assert.equal(c.net![0].num_queues, 4);
  assert.equal(c.rng.src, "/dev/random");
});

Deno.test("cli config: serial and console spellings", () => {
  assert.deepEqual(consoleFromOption("--serial", "file=/tmp/s.log"), { mode: "File", file: "/tmp/s.log" });
  assert.deepEqual(consoleFromOption("--serial", "socket=/tmp/s.sock"), {
    mode: "Socket",
    socket: "/tmp/s.sock",
  });
  assert.deepEqual(consoleFromOption("--console", "null"), { mode: "Null" });
  assert.deepEqual(consoleFromOption("--serial", "pty"), { mode: "Pty" });
  assert.throws(() => consoleFromOption("--console", "socket=/x"), /--console: expected/);
  assert.throws(() => consoleFromOption("--serial", "loud"), /--serial: expected/);
});

Deno.test("cli config: errors name the option", () => {
  const bad: [Record<string, unknown>, RegExp][] = [
    [{ kernel: "/k", cpus: "boot=4,max=2" }, /--cpus: .*boot_vcpus \(4\) must not exceed max_vcpus \(2\)/],
    [{ kernel: "/k", cpus: "boot=two" }, /--cpus: boot: 'two' is not an integer/],
    [{ kernel: "/k", cpus: "bogus=1" }, /--cpus: unknown parameter 'bogus'/],
    [{ kernel: "/k", memory: "size=1000" }, /--memory: .*multiple of 4096/],
    [{ kernel: "/k", memory: "size=1G,shared=maybe" }, /--memory: shared: 'maybe' is not a boolean/],
    [{ kernel: "/k", disk: ["readonly=on"] }, /--disk: disks\.0\.path: a disk needs a path/],
    [{ kernel: "/k", disk: ["path=/a,id=x", "path=/b,id=x"] }, /--disk: .*identifier 'x' is used by both/],
    [{ kernel: "/k", net: ["tap=t0,mac=zz"] }, /--net: net\.0\.mac: must be a MAC address/],
    [{ kernel: "/k", net: ["tap=t0,num_queues=3"] }, /--net: .*must be even/],
    [{ kernel: "/k", serial: "tty", console: "tty" }, /--console: .*cannot both use the terminal/],
    [{ cpus: "boot=1" }, /--kernel \(or --firmware\) is required/],
    [{ kernel: "/k", disk: ["path"] }, /--disk: expected key=value/],
    [{ kernel: "/k", disk: ["path=/a,path=/b"] }, /given twice/],
  ];
  for (const [opts, re] of bad) {
    assert.throws(
      () => vmConfigFromCli(opts),
      (e: Error) => e instanceof ConfigError && re.test(e.message),
      re.source,
    );
  }
});

Deno.test("cli config: single devices for dvmm remote", () => {
  assert.deepEqual(parseDiskConfig("path=/x.img,id=d1").id, "d1");
  assert.throws(() => parseDiskConfig("id=d1"), /add-disk: .*a disk needs a path/);
  assert.deepEqual(parseNetConfig("fd=[3,4],mac=12:34:56:78:90:ab").fds, [3, 4]);
  assert.equal(parseRestoreConfig("source_url=file:///tmp/snap,prefault=on").prefault, true);
  assert.throws(() => parseRestoreConfig("prefault=on"), /source_url: required/);
});

Deno.test("cli config: --api-socket and --event-monitor values", () => {
  assert.deepEqual(parseApiSocketOption("path=/tmp/a.sock"), { path: "/tmp/a.sock" });
  assert.deepEqual(parseApiSocketOption("/tmp/a.sock"), { path: "/tmp/a.sock" });
  assert.deepEqual(parseApiSocketOption("fd=3"), { fd: 3 });
  assert.throws(() => parseApiSocketOption("fd=x"), /fd must be a file descriptor number/);
  assert.throws(() => parseApiSocketOption("path="), /expected path=PATH or fd=N/);
  assert.deepEqual(parseEventMonitorOption("path=/tmp/e.json"), { path: "/tmp/e.json" });
  assert.deepEqual(parseEventMonitorOption("fd=4"), { fd: 4 });
});
