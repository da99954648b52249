/**
 * The serial port's `pty` and `socket=PATH` modes on this host's KVM, with a tiny guest that echoes
 * what it reads from COM1 and powers off on `q`: a user attaches to the pty (or connects to the
 * socket), types, and sees the guest's answer; vm.info reports the pty's path in `file`.
 */
import assert from "node:assert/strict";
import { Vm } from "../vmm/vm.ts";
import { VmConfigSchema } from "../vmm/vm_config.ts";
import type { GuestEvent } from "../vmm/control.ts";
import { pvhElf } from "./helpers/tiny_guest.ts";
import { kvmAvailable } from "./helpers/realmode.ts";

const ignore = !kvmAvailable();

/** 32-bit: wait for LSR.DR, read RBR, write it back to THR; on 'q' power off through port 0x600. */
const ECHO_GUEST = new Uint8Array([
  0x66,
  0xba,
  0xfd,
  0x03, // 0: mov dx, 0x3fd
  0xec, // 4: in al, dx
  0xa8,
  0x01, // test al, 1
  0x74,
  0xfb, // jz 4
  0x66,
  0xba,
  0xf8,
  0x03, // 9: mov dx, 0x3f8
  0xec, // in al, dx
  0xee, // out dx, al
  0x3c,
  0x71, // cmp al, 'q'
  0x74,
  0x02, // je 21
  0xeb,
  0xeb, // jmp 0
  0x66,
  0xba,
  0x00,
  0x06, // 21: mov dx, 0x600
  0xb0,
  0x34, // mov al, 0x34
  0xee, // out dx, al
  0xf4, // hlt
  0xeb,
  0xfd, // jmp hlt
]);

async function echoVm(serial: Record<string, unknown>) {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-serial-" });
  await Deno.writeFile(`${dir}/guest.elf`, pvhElf(ECHO_GUEST));
  const config = VmConfigSchema.parse({
    memory: { size: 64 << 20 },
    payload: { kernel: `${dir}/guest.elf` },
    serial: typeof serial.socket === "string" ? { ...serial, socket: `${dir}/${serial.socket}` } : serial,
    console: { mode: "Off" },
  });
  const vm = new Vm(config);
  const event = new Promise<GuestEvent>((resolve) => vm.onGuestEvent(resolve));
  await vm.boot();
  return { vm, config, event, dir };
}

/** Reads until `want` shows up, the other side closes, or 10 s pass (one read in flight at a time). */
async function readUntil(r: { read(b: Uint8Array): Promise<number | null> }, want: string): Promise<string> {
  let text = "";
  const buf = new Uint8Array(256);
  const deadline = Date.now() + 10_000;
  let pending: Promise<number | null> | null = null;
  while (!text.includes(want) && Date.now() < deadline) {
    pending ??= r.read(buf);
    const n = await Promise.race([pending, new Promise<"wait">((res) => setTimeout(() => res("wait"), 200))]);
    if (n === "wait") continue;
    pending = null;
    if (n === null) break; // closed by the other side
    text += new TextDecoder().decode(buf.subarray(0, n));
  }
  return text;
}

Deno.test(
  { name: "serial pty: the guest's COM1 is a pseudo-terminal whose path vm.info reports", ignore },
  async () => {
    const g = await echoVm({ mode: "Pty" });
    try {
      const path = g.config.serial.file;
      assert.match(path ?? "", /^\/dev\/pts\/\d+$/, "the pty's path is recorded in serial.file");
      const tty = await Deno.open(path!, { read: true, write: true });
      await tty.write(new TextEncoder().encode("ping-pty"));
      assert.match(await readUntil(tty, "ping-pty"), /ping-pty/, "typed bytes come back from the guest");
      await tty.write(new TextEncoder().encode("q"));
      assert.equal(await g.event, "poweroff");
      tty.close();
    } finally {
      await g.vm.shutdown();
      await Deno.remove(g.dir, { recursive: true });
    }
  },
);

Deno.test(
  { name: "serial socket=PATH: one client at a time types to the guest and reads it", ignore },
  async () => {
    const g = await echoVm({ mode: "Socket", socket: "serial.sock" });
    try {
      const path = g.config.serial.socket!;
      assert.ok(Deno.lstatSync(path).isSocket);
      const c = await Deno.connect({ transport: "unix", path });
      await new Promise((r) => setTimeout(r, 300)); // the VMM picks the client up
      // A second client is refused while the first is connected.
      const other = await Deno.connect({ transport: "unix", path });
      assert.equal(await readUntil(other, "never"), "", "the second client gets nothing");
      other.close();
      await c.write(new TextEncoder().encode("ping-sock"));
      assert.match(await readUntil(c, "ping-sock"), /ping-sock/);
      c.close();
      await new Promise((r) => setTimeout(r, 300));
      // The next client takes over; the guest keeps running meanwhile.
      const c2 = await Deno.connect({ transport: "unix", path });
      await new Promise((r) => setTimeout(r, 300));
      await c2.write(new TextEncoder().encode("again"));
      assert.match(await readUntil(c2, "again"), /again/);
      await c2.write(new TextEncoder().encode("q"));
      assert.equal(await g.event, "poweroff");
      c2.close();
    } finally {
      await g.vm.shutdown();
      await Deno.remove(g.dir, { recursive: true });
    }
    assert.throws(() => Deno.lstatSync(`${g.dir}/serial.sock`), "the socket is removed with the VM");
  },
);

Deno.test(
  { name: "console pty: the virtio console gets a pseudo-terminal, reported in file", ignore },
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "dvmm-console-" });
    await Deno.writeFile(`${dir}/guest.elf`, pvhElf(ECHO_GUEST));
    const config = VmConfigSchema.parse({
      memory: { size: 64 << 20 },
      payload: { kernel: `${dir}/guest.elf` },
      serial: { mode: "Null" },
      console: { mode: "Pty" },
    });
    const vm = new Vm(config);
    try {
      await vm.boot();
      const path = config.console.file;
      assert.match(path ?? "", /^\/dev\/pts\/\d+$/, "the console's pty path is recorded in console.file");
      const tty = await Deno.open(path!, { read: true, write: true });
      tty.close();
      assert.ok(Object.keys(vm.deviceTree()).includes("__console"));
    } finally {
      await vm.shutdown();
      await Deno.remove(dir, { recursive: true });
    }
  },
);
