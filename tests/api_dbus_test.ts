/**
 * The D-Bus API, driven as a user would: a private dbus-daemon, the service on it in front of a real
 * control loop (fake VM backends) and the real API dispatch, and the stock D-Bus command-line tools
 * (dbus-send for calls, dbus-monitor for the Event signal). Needs the Debian packages dbus-daemon and
 * dbus-bin (both come with `dbus`).
 */
import assert from "node:assert/strict";
import { ControlLoop } from "../vmm/control.ts";
import { EventMonitor } from "../vmm/events.ts";
import { EXAMPLE_VM, fakeFactory } from "../api/testing.ts";
import type { Logger } from "../vmm/log.ts";
import {
  busAddressFor,
  type CallApi,
  DBUS_ERROR_FAILED,
  DBUS_INTERFACE,
  DBUS_METHODS,
  dbusOptionsFrom,
  type DbusService,
  startDbusService,
} from "../api/dbus.ts";

const NAME = "org.cloudhypervisor.DBusApi";
const PATH = "/org/cloudhypervisor/DBusApi";
const decoder = new TextDecoder();

// ---------------------------------------------------------------------------------------------------
// A private bus

interface TestBus {
  address: string;
  dir: string;
  close(): Promise<void>;
}

const BUS_CONFIG = (socket: string) =>
  `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=${socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
`;

const TOOLS = { "dbus-daemon": "dbus-daemon", "dbus-send": "dbus-bin", "dbus-monitor": "dbus-bin" };

/** Fail loudly, naming the package, when a D-Bus tool these tests use is missing. */
function requireTools(): void {
  const dirs = (Deno.env.get("PATH") ?? "").split(":").filter((d) => d !== "");
  const missing = Object.entries(TOOLS).filter(([tool]) =>
    !dirs.some((d) => {
      try {
        return Deno.statSync(`${d}/${tool}`).isFile;
      } catch {
        return false;
      }
    })
  );
  if (missing.length > 0) {
    throw new Error(
      `the D-Bus API tests need ${missing.map(([t, p]) => `${t} (Debian package ${p})`).join(", ")}; ` +
        `'apt-get install dbus' brings them all`,
    );
  }
}

/** Start a dbus-daemon of our own on a socket in a fresh temporary directory. */
async function startBus(): Promise<TestBus> {
  requireTools();
  const dir = await Deno.makeTempDir({ prefix: "dvmm-dbus-" });
  await Deno.writeTextFile(`${dir}/bus.conf`, BUS_CONFIG(`${dir}/bus.sock`));
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command("dbus-daemon", {
      args: [`--config-file=${dir}/bus.conf`, "--nofork", "--print-address"],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
  } catch (e) {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    throw new Error(`cannot start dbus-daemon: ${(e as Error).message}`);
  }
  const stderr = new Response(child.stderr).text();
  const reader = child.stdout.getReader();
  const stop = async () => {
    try {
      child.kill("SIGTERM");
    } catch { /* already gone */ }
    await child.status;
    await reader.cancel().catch(() => {});
    const err = await stderr;
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    return err;
  };
  let out = "";
  const deadline = Date.now() + 10_000;
  while (!out.includes("\n")) {
    const chunk = await Promise.race([
      reader.read(),
      new Promise<null>((r) => setTimeout(() => r(null), Math.max(0, deadline - Date.now()))),
    ]);
    if (chunk === null || chunk.done) {
      const err = await stop();
      throw new Error(`dbus-daemon did not start: ${err.trim() || "no address printed"}`);
    }
    out += decoder.decode(chunk.value);
  }
  return { address: out.split("\n")[0].trim(), dir, close: async () => void (await stop()) };
}

// ---------------------------------------------------------------------------------------------------
// Calls as a user makes them

type SendResult = { ok: true; value?: string } | { ok: false; name: string; message: string };

/** `dbus-send --print-reply` a method call; a string reply is returned as is, an error by name and text. */
async function dbusSend(
  address: string,
  member: string,
  arg?: string,
  opts: { iface?: string; dest?: string; path?: string } = {},
): Promise<SendResult> {
  const args = [
    `--bus=${address}`,
    "--print-reply",
    "--reply-timeout=20000",
    `--dest=${opts.dest ?? NAME}`,
    opts.path ?? PATH,
    `${opts.iface ?? DBUS_INTERFACE}.${member}`,
  ];
  if (arg !== undefined) args.push(`string:${arg}`);
  const r = await new Deno.Command("dbus-send", { args, stdin: "null", stdout: "piped", stderr: "piped" })
    .output();
  const stdout = decoder.decode(r.stdout);
  const stderr = decoder.decode(r.stderr);
  if (!r.success) {
    // "Error org.freedesktop.DBus.Error.Failed: <message>"
    const m = /^Error ([^:\s]+): ([\s\S]*)$/.exec(stderr.trim());
    assert.ok(m, `dbus-send ${member} failed without a D-Bus error: ${stderr}`);
    return { ok: false, name: m[1], message: m[2] };
  }
  const nl = stdout.indexOf("\n");
  assert.match(stdout, /^method return /, `unexpected dbus-send output: ${stdout}`);
  const rest = stdout.slice(nl + 1);
  if (rest.trim() === "") return { ok: true };
  // dbus-send prints a string argument unescaped: `   string "<text>"`
  const prefix = '   string "';
  assert.ok(rest.startsWith(prefix) && rest.trimEnd().endsWith('"'), `unexpected reply: ${rest}`);
  return { ok: true, value: rest.trimEnd().slice(prefix.length, -1) };
}

async function call(address: string, member: string, arg?: string): Promise<string | undefined> {
  const r = await dbusSend(address, member, arg);
  if (!r.ok) assert.fail(`${member} failed: ${r.name}: ${r.message}`);
  return r.value;
}

async function callFails(address: string, member: string, arg?: string): Promise<string[]> {
  const r = await dbusSend(address, member, arg);
  assert.ok(!r.ok, `${member} should have failed, answered ${JSON.stringify(r)}`);
  assert.equal(r.name, DBUS_ERROR_FAILED);
  const messages = JSON.parse(r.message);
  assert.ok(Array.isArray(messages) && messages.every((m) => typeof m === "string"), r.message);
  return messages;
}

/** `dbus-monitor` for the Event signal: the events' JSON texts, as they come. */
class EventWatcher {
  readonly #child: Deno.ChildProcess;
  readonly #reader: ReadableStreamDefaultReader<Uint8Array>;
  #text = "";

  private constructor(child: Deno.ChildProcess) {
    this.#child = child;
    this.#reader = child.stdout.getReader();
  }

  static async start(address: string): Promise<EventWatcher> {
    const child = new Deno.Command("dbus-monitor", {
      args: [`--address`, address, `type='signal',interface='${DBUS_INTERFACE}',member='Event'`],
      stdin: "null",
      stdout: "piped",
      stderr: "null",
    }).spawn();
    const w = new EventWatcher(child);
    // dbus-monitor tells itself it has become a monitor (NameAcquired, then NameLost) once it listens.
    await w.#until(() => w.#text.includes("member=NameLost"), "dbus-monitor to start");
    return w;
  }

  /** The Event signals' string arguments seen so far. */
  events(): string[] {
    const out: string[] = [];
    const blocks = this.#text.split(/\n(?=(?:signal|method call|method return|error) time=)/);
    for (const b of blocks) {
      if (!/ member=Event\n/.test(b)) continue;
      const body = b.slice(b.indexOf("\n") + 1).trimEnd();
      const prefix = '   string "';
      if (body.startsWith(prefix) && body.endsWith('"')) out.push(body.slice(prefix.length, -1));
    }
    return out;
  }

  /** Wait until an Event with this source and name has been seen; returns its parsed object. */
  async waitFor(source: string, event: string): Promise<Record<string, unknown>> {
    let found: Record<string, unknown> | undefined;
    await this.#until(() => {
      found = this.events().map((e) => JSON.parse(e)).find((e) => e.source === source && e.event === event);
      return found !== undefined;
    }, `the Event signal ${source}/${event} (seen: ${this.events().join(" | ")})`);
    return found!;
  }

  async #until(done: () => boolean, what: string): Promise<void> {
    const deadline = Date.now() + 10_000;
    while (!done()) {
      const left = deadline - Date.now();
      const chunk = left <= 0 ? null : await Promise.race([
        this.#reader.read(),
        new Promise<null>((r) => setTimeout(() => r(null), left)),
      ]);
      if (chunk === null || chunk.done) throw new Error(`timed out waiting for ${what}`);
      this.#text += decoder.decode(chunk.value, { stream: true });
    }
  }

  async close(): Promise<void> {
    try {
      this.#child.kill("SIGTERM");
    } catch { /* already gone */ }
    await this.#reader.cancel().catch(() => {});
    await this.#child.status;
  }
}

// ---------------------------------------------------------------------------------------------------
// dvmm with the D-Bus API on a private bus

interface Vmm {
  bus: TestBus;
  loop: ControlLoop;
  service: DbusService;
  log: Logger & { lines: string[] };
  close(): Promise<void>;
}

async function startVmm(): Promise<Vmm> {
  const bus = await startBus();
  try {
    let service: DbusService | null = null;
    // The real event monitor's formatting, its lines going to the D-Bus service instead of a file.
    const events = new EventMonitor({
      writeSync(p: Uint8Array) {
        service?.emitEvent(decoder.decode(p).trimEnd());
        return p.length;
      },
    });
    const loop = new ControlLoop({ factory: fakeFactory().factory, events });
    const log = recordingLogger();
    service = await startDbusService(
      { serviceName: NAME, objectPath: PATH, systemBus: false, busAddress: bus.address },
      loop,
      log,
    );
    const s = service;
    return {
      bus,
      loop,
      service: s,
      log,
      async close() {
        try {
          await s.close();
        } finally {
          await bus.close();
        }
      },
    };
  } catch (e) {
    await bus.close();
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------------

Deno.test("D-Bus options: name and path come together, and must be valid", () => {
  assert.equal(dbusOptionsFrom(undefined, undefined), null);
  assert.equal(dbusOptionsFrom(undefined, undefined, true), null);
  assert.deepEqual(dbusOptionsFrom(NAME, PATH), { serviceName: NAME, objectPath: PATH, systemBus: false });
  assert.deepEqual(dbusOptionsFrom(NAME, "/", true), { serviceName: NAME, objectPath: "/", systemBus: true });
  assert.throws(() => dbusOptionsFrom(NAME, undefined), /--dbus-object-path/);
  assert.throws(() => dbusOptionsFrom(undefined, PATH), /--dbus-service-name/);
  for (const bad of ["org", "org..x", ":1.5", "org.1x", "org.x/y", ""]) {
    assert.throws(() => dbusOptionsFrom(bad, PATH), /--dbus-service-name/, bad);
  }
  for (const bad of ["org/x", "/org/", "/org//x", "/org/x-y", ""]) {
    assert.throws(() => dbusOptionsFrom(NAME, bad), /--dbus-object-path/, bad);
  }
});

Deno.test("D-Bus options: the session and system buses are found as the D-Bus specification says", () => {
  const env = (vars: Record<string, string>) => (name: string) => vars[name];
  assert.equal(busAddressFor(false, env({ DBUS_SESSION_BUS_ADDRESS: "unix:path=/a" })), "unix:path=/a");
  assert.equal(busAddressFor(false, env({ XDG_RUNTIME_DIR: "/run/user/7" })), "unix:path=/run/user/7/bus");
  assert.throws(() => busAddressFor(false, env({})), /no session bus/);
  assert.equal(
    busAddressFor(true, env({ DBUS_SESSION_BUS_ADDRESS: "x" })),
    "unix:path=/var/run/dbus/system_bus_socket",
  );
  assert.equal(busAddressFor(true, env({ DBUS_SYSTEM_BUS_ADDRESS: "unix:path=/b" })), "unix:path=/b");
});

Deno.test("D-Bus API: ping, create, info, boot, events, errors, shutdown — driven with dbus-send", async () => {
  const vmm = await startVmm();
  let watcher: EventWatcher | null = null;
  try {
    const { address } = vmm.bus;

    const ping = JSON.parse((await call(address, "VmmPing"))!);
    assert.equal(typeof ping.version, "string");
    assert.equal(ping.pid, Deno.pid);

    // No VM yet: the REST API's error, as a D-Bus error carrying the same JSON messages.
    const notCreated = await callFails(address, "VmInfo");
    assert.match(notCreated.join(" "), /not created/);

    // A body that is not JSON: our message, not a crash.
    const bad = await callFails(address, "VmCreate", "{not json");
    assert.match(bad.join(" "), /JSON/);
    assert.equal(vmm.loop.state, null);

    assert.equal(await call(address, "VmCreate", JSON.stringify(EXAMPLE_VM)), undefined);
    let info = JSON.parse((await call(address, "VmInfo"))!);
    assert.equal(info.state, "Created");
    assert.equal(info.config.cpus.boot_vcpus, 4);
    assert.equal(info.config.payload.kernel, EXAMPLE_VM.payload.kernel);

    // A second create is refused by the control loop.
    assert.match((await callFails(address, "VmCreate", JSON.stringify(EXAMPLE_VM))).join(" "), /already/);

    watcher = await EventWatcher.start(address);
    assert.equal(await call(address, "VmBoot"), undefined);
    const booted = await watcher.waitFor("vm", "booted");
    assert.ok(booted.timestamp && typeof booted.timestamp === "object", JSON.stringify(booted));
    info = JSON.parse((await call(address, "VmInfo"))!);
    assert.equal(info.state, "Running");

    // A method with an optional string reply answers the body when there is one.
    const counters = JSON.parse((await call(address, "VmCounters"))!);
    assert.equal(typeof counters, "object");

    // Something dvmm cannot do yet: the same clear error as over REST.
    const addDisk = await callFails(address, "VmAddDisk", JSON.stringify({ path: "/tmp/x.img" }));
    assert.match(addDisk.join(" "), /not implemented/);

    // A body of the wrong shape is refused with the schema's messages.
    const wrong = await callFails(address, "VmResize", JSON.stringify({ desired_vcpus: "many" }));
    assert.ok(wrong.length > 0);

    await call(address, "VmPause");
    assert.equal(JSON.parse((await call(address, "VmInfo"))!).state, "Paused");
    await call(address, "VmResume");
    assert.equal(await call(address, "VmShutdown"), undefined);
    await watcher.waitFor("vm", "shutdown");
    assert.equal(JSON.parse((await call(address, "VmInfo"))!).state, "Shutdown");

    // VmmShutdown is answered before the VMM goes.
    assert.equal(await call(address, "VmmShutdown"), undefined);
    assert.equal(await vmm.loop.exited, 0);
    await watcher.waitFor("vmm", "shutdown");
  } finally {
    await watcher?.close();
    await vmm.close();
  }
});

Deno.test("D-Bus API: introspection shows Cloud Hypervisor's interface", async () => {
  const vmm = await startVmm();
  try {
    const r = await dbusSend(vmm.bus.address, "Introspect", undefined, {
      iface: "org.freedesktop.DBus.Introspectable",
    });
    assert.ok(r.ok && r.value, JSON.stringify(r));
    const xml = r.value;
    assert.ok(xml.includes(`<interface name="${DBUS_INTERFACE}">`), xml);
    for (const [member, m] of Object.entries(DBUS_METHODS)) {
      const re = new RegExp(`<method name="${member}">([\\s\\S]*?)</method>|<method name="${member}"/>`);
      const found = re.exec(xml);
      assert.ok(found, `${member} missing from ${xml}`);
      const body = found[1] ?? "";
      if (m.arg) assert.match(body, new RegExp(`<arg direction="in" type="s" name="${m.arg}"/>`), member);
      assert.equal(/direction="in"/.test(body), m.arg !== undefined, member);
      assert.equal(/direction="out"/.test(body), m.returns, member);
    }
    assert.match(xml, /<signal name="Event">\s*<arg [^>]*type="s"[^>]*\/>/);
    assert.match(xml, /<signal name="Event">\s*<arg [^>]*name="event"/);
  } finally {
    await vmm.close();
  }
});

Deno.test("D-Bus API: net descriptors as numbers in a JSON body are refused, never dropped", async () => {
  const vmm = await startVmm();
  try {
    const config = { ...EXAMPLE_VM, net: [{ ...EXAMPLE_VM.net[0], fds: [3] }] };
    const msgs = await callFails(vmm.bus.address, "VmCreate", JSON.stringify(config));
    assert.match(msgs.join(" "), /net\.fds: file descriptors cannot be given as numbers/);
    await callFails(vmm.bus.address, "VmInfo"); // nothing was created
  } finally {
    await vmm.close();
  }
});

Deno.test("D-Bus API: unknown methods and wrong arguments are D-Bus errors", async () => {
  const vmm = await startVmm();
  try {
    const r1 = await dbusSend(vmm.bus.address, "VmFly");
    assert.ok(!r1.ok && r1.name === "org.freedesktop.DBus.Error.UnknownMethod", JSON.stringify(r1));
    // VmBoot takes no argument.
    const r2 = await dbusSend(vmm.bus.address, "VmBoot", "{}");
    assert.ok(!r2.ok, JSON.stringify(r2));
    // An empty body where one is needed.
    assert.ok((await callFails(vmm.bus.address, "VmAddDisk", "")).length > 0);
    // Still serving.
    assert.ok(JSON.parse((await call(vmm.bus.address, "VmmPing"))!).version);
  } finally {
    await vmm.close();
  }
});

Deno.test("D-Bus API: a name already owned is refused; closing releases it", async () => {
  const vmm = await startVmm();
  try {
    const loop = new ControlLoop({ factory: fakeFactory().factory });
    await assert.rejects(
      startDbusService(
        { serviceName: NAME, objectPath: PATH, systemBus: false, busAddress: vmm.bus.address },
        loop,
      ),
      /already owned/,
    );
    await vmm.service.close();
    await vmm.service.close(); // idempotent
    const again = await startDbusService(
      { serviceName: NAME, objectPath: PATH, systemBus: false, busAddress: vmm.bus.address },
      loop,
    );
    try {
      assert.ok(JSON.parse((await call(vmm.bus.address, "VmmPing"))!).version);
    } finally {
      await again.close();
    }
  } finally {
    await vmm.close();
  }
});

Deno.test("D-Bus API: no bus to connect to is a clear start-up error", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dvmm-dbus-" });
  try {
    const loop = new ControlLoop({ factory: fakeFactory().factory });
    await assert.rejects(
      startDbusService({
        serviceName: NAME,
        objectPath: PATH,
        systemBus: false,
        busAddress: `unix:path=${dir}/nobody.sock`,
        connectTimeoutMs: 3000,
      }, loop),
      (e: Error) => {
        assert.match(e.message, /D-Bus API: cannot serve org\.cloudhypervisor\.DBusApi on the session bus/);
        assert.match(e.message, /nobody\.sock/);
        return true;
      },
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("D-Bus API: closing right after VmmShutdown still answers it", async () => {
  const vmm = await startVmm();
  try {
    const sending = dbusSend(vmm.bus.address, "VmmShutdown");
    // What dvmm's main does: wait for the VMM to end, then close the front ends.
    assert.equal(await vmm.loop.exited, 0);
    await vmm.service.close();
    assert.deepEqual(await sending, { ok: true });
  } finally {
    await vmm.close();
  }
});

/** A logger that keeps its lines. */
function recordingLogger(): Logger & { lines: string[] } {
  const lines: string[] = [];
  const keep = (level: string) => (m: string) => void lines.push(`${level}: ${m}`);
  return {
    lines,
    error: keep("error"),
    warn: keep("warn"),
    info: keep("info"),
    debug: keep("debug"),
    trace: keep("trace"),
  };
}

Deno.test("D-Bus API: the bus going away mid-call does not stop the VMM", async () => {
  const bus = await startBus();
  let busUp = true;
  let service: DbusService | null = null;
  try {
    const loop = new ControlLoop({ factory: fakeFactory().factory });
    let entered!: () => void;
    const inCall = new Promise<void>((r) => (entered = r));
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    // A call that is still being answered when the bus dies.
    const slowCall: CallApi = async () => {
      entered();
      await gate;
      return { status: 200, body: '{"state":"Running"}' };
    };
    const log = recordingLogger();
    service = await startDbusService(
      { serviceName: NAME, objectPath: PATH, systemBus: false, busAddress: bus.address, callApi: slowCall },
      loop,
      log,
    );
    const client = new Deno.Command("dbus-send", {
      args: [`--bus=${bus.address}`, "--print-reply", `--dest=${NAME}`, PATH, `${DBUS_INTERFACE}.VmInfo`],
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).output();
    await inCall;
    await bus.close();
    busUp = false;
    release();
    assert.equal((await client).success, false);
    await new Promise((r) => setTimeout(r, 100));
    service.emitEvent('{"source":"vm","event":"booted"}');
    assert.ok((await loop.request("vmm.ping")).ok);
    assert.ok(log.lines.some((l) => /^error: D-Bus API: lost the connection/.test(l)), log.lines.join("\n"));
    await service.close();
  } finally {
    await service?.close();
    if (busUp) await bus.close();
  }
});

Deno.test("D-Bus API: a reply that comes after close() is dropped, not thrown", async () => {
  const bus = await startBus();
  let service: DbusService | null = null;
  try {
    const loop = new ControlLoop({ factory: fakeFactory().factory });
    let entered!: () => void;
    const inCall = new Promise<void>((r) => (entered = r));
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const slowCall: CallApi = async () => {
      entered();
      await gate;
      return { status: 200, body: '{"state":"Running"}' };
    };
    service = await startDbusService(
      {
        serviceName: NAME,
        objectPath: PATH,
        systemBus: false,
        busAddress: bus.address,
        callApi: slowCall,
        drainTimeoutMs: 50,
      },
      loop,
      recordingLogger(),
    );
    const client = new Deno.Command("dbus-send", {
      args: [`--bus=${bus.address}`, "--print-reply", `--dest=${NAME}`, PATH, `${DBUS_INTERFACE}.VmInfo`],
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).output();
    await inCall;
    await service.close(); // gives up waiting for the call after 50 ms
    release();
    assert.equal((await client).success, false);
    await new Promise((r) => setTimeout(r, 50));
  } finally {
    await service?.close();
    await bus.close();
  }
});
