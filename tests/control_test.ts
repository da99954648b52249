import { EVENT_SOURCE_NAMES, EventSource } from "../devices/shared.ts";
import { VmEvent, VmEvents } from "../vmm/vcpu_control.ts";
import assert from "node:assert/strict";
import { ControlLoop, type VmmRequest, type VmmResponse } from "../vmm/control.ts";
import { VmConfigSchema } from "../vmm/vm_config.ts";
import { EXAMPLE_VM, fakeFactory, RecordingEvents } from "../api/testing.ts";

const config = () => VmConfigSchema.parse(EXAMPLE_VM);

function setup() {
  const { factory, made } = fakeFactory();
  const events = new RecordingEvents();
  const loop = new ControlLoop({ factory, events });
  return { loop, made, events };
}

function errKind(r: VmmResponse): string | null {
  return r.ok ? null : r.error.kind;
}

/** Let queued guest events be handled. */
const settle = () => new Promise((r) => setTimeout(r, 10));

Deno.test("control: ping answers without a VM", async () => {
  const { loop } = setup();
  const r = await loop.request("vmm.ping");
  assert.ok(r.ok);
  assert.equal((r.body as { pid: number }).pid, Deno.pid);
  assert.equal(typeof (r.body as { version: string }).version, "string");
});

Deno.test("control: actions before create answer NotCreated; delete is fine", async () => {
  const { loop } = setup();
  for (
    const k of [
      "vm.boot",
      "vm.shutdown",
      "vm.reboot",
      "vm.pause",
      "vm.resume",
      "vm.info",
      "vm.counters",
    ] as const
  ) {
    assert.equal(errKind(await loop.request(k)), "NotCreated", k);
  }
  assert.equal(errKind(await loop.request("vm.power-button")), "NotCreated");
  assert.equal(errKind(await loop.request("vm.nmi")), "NotCreated");
  assert.ok((await loop.request("vm.delete")).ok);
});

Deno.test("control: full life cycle with events and state checks", async () => {
  const { loop, made, events } = setup();
  assert.ok((await loop.request("vm.create", config())).ok);
  assert.equal(loop.state, "Created");
  assert.equal(errKind(await loop.request("vm.create", config())), "WrongState");
  assert.equal(errKind(await loop.request("vm.pause")), "WrongState");
  assert.equal(errKind(await loop.request("vm.shutdown")), "WrongState");
  assert.equal(errKind(await loop.request("vm.counters")), "WrongState");

  assert.ok((await loop.request("vm.boot")).ok);
  assert.equal(loop.state, "Running");
  assert.equal(errKind(await loop.request("vm.boot")), "WrongState");
  assert.equal(errKind(await loop.request("vm.resume")), "WrongState");

  assert.ok((await loop.request("vm.pause")).ok);
  assert.equal(loop.state, "Paused");
  assert.equal(errKind(await loop.request("vm.pause")), "WrongState");
  assert.ok((await loop.request("vm.resume")).ok);
  assert.ok((await loop.request("vm.power-button")).ok);
  assert.ok((await loop.request("vm.nmi")).ok);

  const info = await loop.request("vm.info");
  assert.ok(info.ok);
  const body = info.body as { state: string; config: { cpus: { boot_vcpus: number } }; device_tree: object };
  assert.equal(body.state, "Running");
  assert.equal(body.config.cpus.boot_vcpus, 4);
  assert.ok(body.device_tree);

  const counters = await loop.request("vm.counters");
  assert.ok(counters.ok);

  assert.ok((await loop.request("vm.shutdown")).ok);
  assert.equal(loop.state, "Shutdown");
  assert.deepEqual(made[0].calls, ["boot", "pause", "resume", "powerButton", "nmi", "shutdown"]);
  // A shut-down VM can be booted again, with a fresh backend.
  assert.ok((await loop.request("vm.boot")).ok);
  assert.equal(made.length, 2);
  assert.ok((await loop.request("vm.delete")).ok);
  assert.equal(loop.state, null);
  assert.deepEqual(made[1].calls, ["boot", "shutdown"]);
  assert.deepEqual(events.seen, [
    "vm:created",
    "vm:booting",
    "vm:booted",
    "vm:pausing",
    "vm:paused",
    "vm:resuming",
    "vm:resumed",
    "vm:shutdown",
    "vm:booting",
    "vm:booted",
    "vm:shutdown",
    "vm:deleted",
  ]);
});

Deno.test("control: API reboot replaces the backend", async () => {
  const { loop, made, events } = setup();
  await loop.request("vm.create", config());
  await loop.request("vm.boot");
  assert.ok((await loop.request("vm.reboot")).ok);
  assert.equal(made.length, 2);
  assert.deepEqual(made[0].calls, ["boot", "shutdown"]);
  assert.deepEqual(made[1].calls, ["boot"]);
  assert.equal(loop.state, "Running");
  assert.ok(events.seen.includes("vm:rebooting") && events.seen.includes("vm:rebooted"));
});

Deno.test("control: guest reboot re-creates the VM; stale events are ignored", async () => {
  const { loop, made } = setup();
  await loop.request("vm.create", config());
  await loop.request("vm.boot");
  made[0].guest("reboot");
  await settle();
  assert.equal(made.length, 2);
  assert.equal(loop.state, "Running");
  made[0].guest("poweroff"); // from the released backend: ignored
  await settle();
  assert.equal(loop.state, "Running");
  made[1].guest("reboot"); // a triple fault arrives as a reboot too
  await settle();
  assert.equal(made.length, 3);
});

Deno.test("control: a VM crash ends the VMM with status 1 instead of rebooting", async () => {
  const { loop, made } = setup();
  await loop.request("vm.create", config());
  await loop.request("vm.boot");
  made[0].guest("crash");
  assert.equal(await loop.exited, 1);
  assert.equal(made.length, 1, "no new VM was built");
  assert.deepEqual(made[0].calls, ["boot", "shutdown"]);
});

Deno.test("control: guest poweroff shuts the VMM down with status 0", async () => {
  const { loop, made, events } = setup();
  await loop.request("vm.create", config());
  await loop.request("vm.boot");
  made[0].guest("poweroff");
  assert.equal(await loop.exited, 0);
  assert.deepEqual(made[0].calls, ["boot", "shutdown"]);
  assert.ok(events.seen.includes("vmm:shutdown"));
  assert.equal(errKind(await loop.request("vmm.ping")), "ShuttingDown");
});

Deno.test("control: with --no-shutdown a guest poweroff shuts the VM down and the VMM serves on", async () => {
  const { factory, made } = fakeFactory();
  const events = new RecordingEvents();
  const loop = new ControlLoop({ factory, events, noShutdown: true });
  await loop.request("vm.create", config());
  await loop.request("vm.boot");
  made[0].guest("poweroff");
  for (let i = 0; i < 100 && loop.state !== "Shutdown"; i++) await new Promise((r) => setTimeout(r, 5));
  assert.equal(loop.state, "Shutdown");
  assert.deepEqual(made[0].calls, ["boot", "shutdown"]);
  assert.ok(events.seen.includes("vm:shutdown") && !events.seen.includes("vmm:shutdown"));
  assert.ok((await loop.request("vmm.ping")).ok, "the VMM still answers");
  assert.ok((await loop.request("vm.boot")).ok, "and can boot the VM again");
  assert.ok((await loop.request("vmm.shutdown")).ok);
  assert.equal(await loop.exited, 0);
});

Deno.test("control: ping and info are answered while a long boot is under way", async () => {
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const { factory } = fakeFactory();
  const loop = new ControlLoop({
    factory: (cfg) => {
      const b = factory(cfg);
      b.boot = () => gate; // the boot lasts until the test releases it
      return b;
    },
  });
  await loop.request("vm.create", config());
  const boot = loop.request("vm.boot");
  assert.ok((await loop.request("vmm.ping")).ok, "ping does not wait behind the boot");
  const info = await loop.request("vm.info");
  assert.ok(info.ok && (info.body as { state: string }).state === "Created");
  release();
  assert.ok((await boot).ok);
  assert.equal(loop.state, "Running");
});

Deno.test("control: vmm.shutdown releases the VM and resolves exited", async () => {
  const { loop, made } = setup();
  await loop.request("vm.create", config());
  await loop.request("vm.boot");
  assert.ok((await loop.request("vmm.shutdown")).ok);
  assert.equal(await loop.exited, 0);
  assert.deepEqual(made[0].calls, ["boot", "shutdown"]);
});

Deno.test("control: every request gets exactly one reply, also when the backend throws", async () => {
  const { factory, made } = fakeFactory();
  const loop = new ControlLoop({
    factory: (c) => {
      const b = factory(c);
      b.pause = () => Promise.reject(new Error("pause exploded"));
      b.nmi = () => {
        throw new Error("nmi exploded synchronously");
      };
      return b;
    },
  });
  await loop.request("vm.create", config());
  await loop.request("vm.boot");
  const replies: VmmResponse[][] = [];
  const kinds = ["vm.pause", "vm.nmi", "vmm.ping", "vm.info"] as const;
  await Promise.all(kinds.map((kind, i) =>
    new Promise<void>((resolve) => {
      replies[i] = [];
      loop.submit({
        kind,
        body: undefined,
        reply: (r) => {
          replies[i].push(r);
          resolve();
        },
      } as VmmRequest);
    })
  ));
  await settle();
  assert.deepEqual(replies.map((r) => r.length), [1, 1, 1, 1]);
  assert.equal(errKind(replies[0][0]), "Internal");
  assert.deepEqual(!replies[0][0].ok && replies[0][0].error.messages, ["pause exploded"]);
  assert.equal(errKind(replies[1][0]), "Internal");
  assert.ok(replies[2][0].ok && replies[3][0].ok);
  assert.equal(loop.state, "Running"); // a failed pause leaves the state alone
  assert.equal(made.length, 1);
});

Deno.test("control: a failing boot is reported and leaves the VM bootable", async () => {
  const { factory } = fakeFactory();
  let fail = true;
  const loop = new ControlLoop({
    factory: (c) => {
      const b = factory(c);
      if (fail) b.failBoot = new Error("no /dev/kvm");
      return b;
    },
  });
  await loop.request("vm.create", config());
  const r = await loop.request("vm.boot");
  assert.equal(errKind(r), "Internal");
  assert.deepEqual(!r.ok && r.error.messages, ["failed to boot the VM", "no /dev/kvm"]);
  assert.equal(loop.state, "Created");
  fail = false;
  assert.ok((await loop.request("vm.boot")).ok);
});

Deno.test("control: a factory that throws is an error reply", async () => {
  const loop = new ControlLoop({
    factory: () => {
      throw new Error("VM backend not available");
    },
  });
  await loop.request("vm.create", config());
  const r = await loop.request("vm.boot");
  assert.deepEqual(!r.ok && r.error.messages, ["failed to create the VM", "VM backend not available"]);
});

Deno.test("control: cold plug, duplicates, removal and resize before boot", async () => {
  const { loop } = setup();
  await loop.request("vm.create", config());
  const disk = { path: "/tmp/d2.img", id: "disk2" } as never;
  const add = await loop.request("vm.add-disk", disk);
  assert.ok(add.ok && add.body === undefined); // 204: cold added
  assert.equal(errKind(await loop.request("vm.add-disk", disk)), "Conflict");
  assert.equal(errKind(await loop.request("vm.add-net", { id: "disk2" } as never)), "Conflict");
  assert.ok((await loop.request("vm.add-vsock", { cid: 3, socket: "/tmp/v.sock" } as never)).ok);
  assert.equal(
    errKind(await loop.request("vm.add-vsock", { cid: 4, socket: "/tmp/w.sock" } as never)),
    "Conflict",
  );
  // virtio-fs needs shared memory: rejected by the whole-config rules.
  assert.equal(errKind(await loop.request("vm.add-fs", { tag: "t", socket: "/s" } as never)), "BadRequest");

  let info = await loop.request("vm.info");
  const cfg = () => (info.ok ? (info.body as { config: Record<string, unknown> }).config : {});
  assert.equal((cfg().disks as unknown[]).length, 2);

  assert.equal(errKind(await loop.request("vm.remove-device", { id: "nope" })), "NotFound");
  assert.ok((await loop.request("vm.remove-device", { id: "disk2" })).ok);
  assert.ok((await loop.request("vm.resize", { desired_vcpus: 2, desired_ram: 1 << 30 })).ok);
  assert.equal(errKind(await loop.request("vm.resize", { desired_vcpus: 8 })), "BadRequest");
  info = await loop.request("vm.info");
  assert.equal((cfg().disks as unknown[]).length, 1);
  assert.equal((cfg().cpus as { boot_vcpus: number }).boot_vcpus, 2);
  assert.equal((cfg().memory as { size: number }).size, 1 << 30);
});

Deno.test("control: what dvmm cannot do yet says so", async () => {
  const { loop } = setup();
  assert.equal(
    errKind(await loop.request("vm.restore", { source_url: "file:///nonexistent/snap" } as never)),
    "BadRequest",
  );
  assert.equal(
    errKind(await loop.request("vm.receive-migration", { receiver_url: "unix:/x", tls_dir: "/t" } as never)),
    "NotImplemented",
  );
  await loop.request("vm.create", config());
  assert.equal(errKind(await loop.request("vm.restore", { source_url: "file:///x" } as never)), "WrongState");
  await loop.request("vm.boot");
  assert.equal(errKind(await loop.request("vm.snapshot", { destination_url: "file:///x" })), "WrongState");
  const hot = await loop.request("vm.add-disk", { path: "/tmp/x.img" } as never);
  assert.equal(errKind(hot), "NotImplemented");
  assert.match(!hot.ok ? hot.error.messages[0] : "", /not implemented in dvmm yet/);
  assert.equal(errKind(await loop.request("vm.resize", { desired_vcpus: 2 })), "NotImplemented");
  await loop.request("vm.pause");
  const snap = await loop.request("vm.snapshot", { destination_url: "file:///x" });
  assert.equal(errKind(snap), "NotImplemented");
  assert.equal(
    errKind(await loop.request("vm.coredump", { destination_url: "file:///x" })),
    "NotImplemented",
  );
  assert.equal(
    errKind(await loop.request("vm.send-migration", { destination_url: "unix:/x" } as never)),
    "WrongState",
  );
});

Deno.test("VmEvents: the first event raised wins and carries its source; reset clears both", async () => {
  const ev = new VmEvents();
  assert.equal(ev.raise(VmEvent.Reboot, EventSource.TripleFault), true);
  assert.equal(ev.raise(VmEvent.Poweroff, EventSource.AcpiSleepControl), false);
  assert.equal(await ev.next(), VmEvent.Reboot);
  assert.equal(EVENT_SOURCE_NAMES[ev.source], "triple fault");
  ev.reset();
  assert.equal(ev.current, VmEvent.None);
  assert.equal(ev.source, EventSource.Unknown);
  ev.raise(VmEvent.Crash);
  assert.equal(ev.current, VmEvent.Crash);
  assert.equal(ev.source, EventSource.Unknown);
});
