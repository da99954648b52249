/**
 * The D-Bus API (`--dbus-service-name NAME --dbus-object-path PATH [--dbus-system-bus]`): Cloud
 * Hypervisor's `org.cloudhypervisor.DBusApi1` interface, served on the session bus (or the system bus)
 * under a well-known name. It is a second front end to the same endpoints as the REST API: each method
 * takes the REST body as a JSON string (or nothing), runs it through {@link callApi} exactly as the REST
 * server does, and answers with the REST reply body as a JSON string. Endpoints that reply with a body
 * in one case and nothing in another (the `VmAdd*` methods, `VmCounters`) answer "" when there is none,
 * as Cloud Hypervisor's optional strings do.
 *
 * Failures are D-Bus errors named `org.freedesktop.DBus.Error.Failed`, as Cloud Hypervisor's are, whose
 * message is the REST error body: the JSON array of messages, outermost first. A method never throws
 * anything else, and a lost bus connection is logged, not fatal.
 *
 * Every life-cycle event is also published as the `Event` signal, with one string argument: the event's
 * JSON object as the event monitor writes it ({@link DbusService.emitEvent} takes it already formatted).
 *
 * The D-Bus client library (dbus-next) is loaded only when a service is started, so a dvmm run without
 * `--dbus-*` options does not pay for it.
 */
import type { ControlLoop, RequestKind } from "../vmm/control.ts";
import { type Logger, logger } from "../vmm/log.ts";
import { type ApiResult, callApi } from "./dispatch.ts";

/** The interface name, as Cloud Hypervisor's. */
export const DBUS_INTERFACE = "org.cloudhypervisor.DBusApi1";

/** The D-Bus error name of every failed call. */
export const DBUS_ERROR_FAILED = "org.freedesktop.DBus.Error.Failed";

/** One method of the interface: the endpoint it calls, its argument (if any) and whether it returns a string. */
export interface DbusMethod {
  kind: RequestKind;
  /** The name of its one string argument (the request body), as Cloud Hypervisor introspects it. */
  arg?: string;
  /** Whether it answers with one string (the reply body, or "" for none). */
  returns: boolean;
}

/**
 * The methods of `org.cloudhypervisor.DBusApi1`, as Cloud Hypervisor defines them. Its interface has no
 * method for `vm.nmi` and `vm.resize-disk`, so neither has this one.
 */
export const DBUS_METHODS: Readonly<Record<string, DbusMethod>> = {
  VmmPing: { kind: "vmm.ping", returns: true },
  VmmShutdown: { kind: "vmm.shutdown", returns: false },
  VmAddDevice: { kind: "vm.add-device", arg: "device_config", returns: true },
  VmAddDisk: { kind: "vm.add-disk", arg: "disk_config", returns: true },
  VmAddFs: { kind: "vm.add-fs", arg: "fs_config", returns: true },
  VmAddGenericVhostUser: {
    kind: "vm.add-generic-vhost-user",
    arg: "generic_vhost_user_config",
    returns: true,
  },
  VmAddNet: { kind: "vm.add-net", arg: "net_config", returns: true },
  VmAddPmem: { kind: "vm.add-pmem", arg: "pmem_config", returns: true },
  VmAddUserDevice: { kind: "vm.add-user-device", arg: "vm_add_user_device", returns: true },
  VmAddVdpa: { kind: "vm.add-vdpa", arg: "vdpa_config", returns: true },
  VmAddVsock: { kind: "vm.add-vsock", arg: "vsock_config", returns: true },
  VmBoot: { kind: "vm.boot", returns: false },
  VmCoredump: { kind: "vm.coredump", arg: "vm_coredump_data", returns: false },
  VmCounters: { kind: "vm.counters", returns: true },
  VmCreate: { kind: "vm.create", arg: "vm_config", returns: false },
  VmDelete: { kind: "vm.delete", returns: false },
  VmInfo: { kind: "vm.info", returns: true },
  VmPause: { kind: "vm.pause", returns: false },
  VmPowerButton: { kind: "vm.power-button", returns: false },
  VmReboot: { kind: "vm.reboot", returns: false },
  VmRemoveDevice: { kind: "vm.remove-device", arg: "vm_remove_device", returns: false },
  VmResize: { kind: "vm.resize", arg: "vm_resize", returns: false },
  VmResizeZone: { kind: "vm.resize-zone", arg: "vm_resize_zone", returns: false },
  VmRestore: { kind: "vm.restore", arg: "restore_config", returns: false },
  VmReceiveMigration: { kind: "vm.receive-migration", arg: "receive_migration_data", returns: false },
  VmSendMigration: { kind: "vm.send-migration", arg: "send_migration_data", returns: false },
  VmResume: { kind: "vm.resume", returns: false },
  VmShutdown: { kind: "vm.shutdown", returns: false },
  VmSnapshot: { kind: "vm.snapshot", arg: "vm_snapshot_config", returns: false },
};

// ---------------------------------------------------------------------------------------------------
// Options

export interface DbusOptions {
  /** The well-known bus name to own (`--dbus-service-name`). */
  serviceName: string;
  /** The object path the interface is served at (`--dbus-object-path`). */
  objectPath: string;
  /** The system bus instead of the session bus (`--dbus-system-bus`). */
  systemBus: boolean;
}

/** A well-known bus name: two or more dot-separated elements of [A-Za-z0-9_-], none starting with a digit. */
export function isBusName(name: string): boolean {
  return name.length <= 255 && /^[A-Za-z_-][A-Za-z0-9_-]*(\.[A-Za-z_-][A-Za-z0-9_-]*)+$/.test(name);
}

/** An object path: "/" or "/"-separated non-empty elements of [A-Za-z0-9_], no trailing "/". */
export function isObjectPath(path: string): boolean {
  return /^\/([A-Za-z0-9_]+(\/[A-Za-z0-9_]+)*)?$/.test(path);
}

/**
 * The D-Bus options from the command line, or null when the API is not asked for. As in Cloud Hypervisor
 * there are no defaults: the service name and the object path come together or not at all, and
 * `--dbus-system-bus` alone does nothing. Throws with a message for the user when they are wrong.
 */
export function dbusOptionsFrom(
  serviceName: string | undefined,
  objectPath: string | undefined,
  systemBus = false,
): DbusOptions | null {
  if (serviceName === undefined && objectPath === undefined) return null;
  if (objectPath === undefined) throw new Error("--dbus-service-name needs --dbus-object-path too");
  if (serviceName === undefined) throw new Error("--dbus-object-path needs --dbus-service-name too");
  if (!isBusName(serviceName)) {
    throw new Error(
      `--dbus-service-name: '${serviceName}' is not a well-known D-Bus name ` +
        `(dot-separated elements of letters, digits, '_' and '-', at least two, e.g. org.example.Vmm)`,
    );
  }
  if (!isObjectPath(objectPath)) {
    throw new Error(
      `--dbus-object-path: '${objectPath}' is not a D-Bus object path ` +
        `('/'-separated elements of letters, digits and '_', e.g. /org/example/Vmm)`,
    );
  }
  return { serviceName, objectPath, systemBus };
}

// ---------------------------------------------------------------------------------------------------
// The service

/** The transport-neutral call every front end goes through (api/dispatch.ts). */
export type CallApi = (
  loop: ControlLoop,
  kind: RequestKind,
  text: string,
  fds?: number[],
  log?: Logger,
) => Promise<ApiResult>;

export interface DbusServiceOptions extends DbusOptions {
  /** Connect to this bus address instead of the session/system bus's (tests). */
  busAddress?: string;
  /** Use this instead of api/dispatch.ts's `callApi` (tests). */
  callApi?: CallApi;
  /** How long to wait for the bus to accept the connection and the name (default 10 s). */
  connectTimeoutMs?: number;
  /** How long close() waits for the replies under way (default 5 s). */
  drainTimeoutMs?: number;
}

export interface DbusService {
  readonly serviceName: string;
  readonly objectPath: string;
  /** The connection's unique name on the bus (":1.42"). */
  readonly uniqueName: string;
  /** Publish one event (its JSON text, as the event monitor writes it) as the `Event` signal. */
  emitEvent(json: string): void;
  /** Finish the replies under way, release the name and disconnect; idempotent. */
  close(): Promise<void>;
}

/** Where the session or system bus is, as the D-Bus specification (and zbus) finds it. */
export function busAddressFor(systemBus: boolean, env: (name: string) => string | undefined): string {
  if (systemBus) {
    return env("DBUS_SYSTEM_BUS_ADDRESS") || "unix:path=/var/run/dbus/system_bus_socket";
  }
  const session = env("DBUS_SESSION_BUS_ADDRESS");
  if (session) return session;
  const runtime = env("XDG_RUNTIME_DIR");
  if (runtime) return `unix:path=${runtime}/bus`;
  throw new Error(
    "no session bus: DBUS_SESSION_BUS_ADDRESS and XDG_RUNTIME_DIR are not set " +
      "(start dvmm inside a D-Bus session, or use --dbus-system-bus)",
  );
}

type IntrospectXml = {
  method?: { $: { name: string }; arg: { $: Record<string, string> }[] }[];
  signal?: { $: { name: string }; arg: { $: Record<string, string> }[] }[];
};

function describe(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/**
 * Connect to the bus, own `serviceName` and serve the interface at `objectPath`. Rejects when the bus
 * cannot be reached, refuses us, or the name is already owned (as Cloud Hypervisor, it does not queue).
 */
export async function startDbusService(
  opts: DbusServiceOptions,
  loop: ControlLoop,
  log: Logger = logger("dbus"),
): Promise<DbusService> {
  const checked = dbusOptionsFrom(opts.serviceName, opts.objectPath, opts.systemBus);
  if (!checked) throw new Error("D-Bus API: a service name and an object path are needed");
  const { serviceName, objectPath, systemBus } = checked;
  const busLabel = systemBus ? "system bus" : "session bus";
  let address: string;
  try {
    address = opts.busAddress ?? busAddressFor(systemBus, (n) => Deno.env.get(n));
  } catch (e) {
    throw new Error(`D-Bus API: ${describe(e)}`);
  }
  const call: CallApi = opts.callApi ?? callApi;
  const dbus = await import("dbus-next");
  const { DBusError } = dbus;

  // ---- the interface object
  const inFlight = new Set<Promise<unknown>>();
  let closing = false;

  const invoke = async (member: string, m: DbusMethod, arg: unknown): Promise<string | undefined> => {
    let result: ApiResult;
    try {
      const text = m.arg === undefined ? "" : String(arg ?? "");
      log.debug(`${member} → ${m.kind}`);
      result = await call(loop, m.kind, text, [], log);
    } catch (e) {
      // callApi answers every failure itself; anything thrown here is a bug, and still only this call's.
      log.error(`D-Bus ${member} failed: ${(e as Error)?.stack ?? e}`);
      throw new DBusError(DBUS_ERROR_FAILED, JSON.stringify([`${m.kind} failed`, describe(e)]));
    }
    if (result.status >= 300) {
      throw new DBusError(
        DBUS_ERROR_FAILED,
        result.body ?? JSON.stringify([`${m.kind} failed with status ${result.status}`]),
      );
    }
    return m.returns ? (result.body ?? "") : undefined;
  };

  class DbusApi extends dbus.interface.Interface {
    constructor() {
      super(DBUS_INTERFACE);
    }
    /** The `Event` signal: calling it emits its return value. */
    Event(json: string): string {
      return json;
    }
    $introspect(): IntrospectXml {
      // dbus-next knows argument types only; add the names Cloud Hypervisor's introspection shows.
      const base = dbus.interface.Interface.prototype as unknown as { $introspect(): IntrospectXml };
      const xml = base.$introspect.call(this);
      for (const method of xml.method ?? []) {
        const name = DBUS_METHODS[method.$.name]?.arg;
        const input = method.arg.find((a) => a.$.direction === "in");
        if (name && input) input.$.name = name;
      }
      for (const signal of xml.signal ?? []) {
        if (signal.$.name === "Event" && signal.arg[0]) signal.arg[0].$.name = "event";
      }
      return xml;
    }
  }
  const proto = DbusApi.prototype as unknown as Record<string, (arg?: unknown) => Promise<unknown>>;
  const methods: Record<string, { inSignature: string; outSignature: string }> = {};
  for (const [member, m] of Object.entries(DBUS_METHODS)) {
    proto[member] = function (arg?: unknown) {
      const p = invoke(member, m, arg);
      const tracked = p.catch(() => {}).finally(() => inFlight.delete(tracked));
      inFlight.add(tracked);
      return p;
    };
    methods[member] = { inSignature: m.arg === undefined ? "" : "s", outSignature: m.returns ? "s" : "" };
  }
  DbusApi.configureMembers({ methods, signals: { Event: { signature: "s" } } });
  const iface = new DbusApi();

  // ---- the connection
  let bus: ReturnType<typeof dbus.sessionBus>;
  try {
    bus = dbus.sessionBus({ busAddress: address });
  } catch (e) {
    throw new Error(`D-Bus API: cannot connect to the ${busLabel} at ${address}: ${describe(e)}`);
  }
  // While starting, a connection failure fails the start; later it is logged once and the VMM goes on
  // without its D-Bus API. (dbus-next reports failures as 'error' events: unheard, one would end dvmm.)
  let failure: ((e: unknown) => void) | null = null;
  let lost = false;
  const connectionLost = (why: string) => {
    if (lost || closing) return;
    lost = true;
    log.error(
      `D-Bus API: lost the connection to the ${busLabel} (${why}); the D-Bus API is no longer served`,
    );
  };
  bus.on("error", (e: unknown) => {
    if (failure) failure(e);
    else connectionLost(describe(e));
  });
  // dbus-next throws from send() once the stream is closed, and where it sends a method's reply that
  // throw becomes an unhandled rejection: a reply or signal that cannot go out is dropped instead.
  const send = bus.send.bind(bus);
  bus.send = (msg) => {
    if (lost) return;
    try {
      send(msg);
    } catch (e) {
      connectionLost(describe(e));
    }
  };
  const stream = (bus as unknown as { _connection?: { stream?: NodeStream } })._connection?.stream;
  stream?.once("close", () => {
    if (failure) failure(new Error("the bus closed the connection"));
    else connectionLost("the bus closed it");
  });
  const disconnect = async () => {
    const gone = new Promise<void>((resolve) => {
      if (!stream || stream.destroyed) return resolve();
      stream.once("close", () => resolve());
    });
    try {
      bus.disconnect();
    } catch { /* already down */ }
    await withTimeout(gone, 2000).catch(() => stream?.destroy?.());
  };

  try {
    await withTimeout(
      new Promise<void>((resolve, reject) => {
        failure = reject;
        bus.once("connect", () => resolve());
      }),
      opts.connectTimeoutMs ?? 10_000,
    );
    const reply = await withTimeout(
      Promise.race([
        bus.requestName(serviceName, dbus.NameFlag.DO_NOT_QUEUE),
        new Promise<never>((_, reject) => (failure = reject)),
      ]),
      opts.connectTimeoutMs ?? 10_000,
    );
    if (
      reply !== dbus.RequestNameReply.PRIMARY_OWNER && reply !== dbus.RequestNameReply.ALREADY_OWNER
    ) {
      throw new Error(`the name ${serviceName} is already owned by another connection`);
    }
    failure = null;
    bus.export(objectPath, iface);
  } catch (e) {
    failure = () => {};
    closing = true;
    await disconnect();
    const why = e instanceof TimeoutError ? "no answer from the bus" : describe(e);
    throw new Error(`D-Bus API: cannot serve ${serviceName} on the ${busLabel} (${address}): ${why}`);
  }
  const uniqueName = (bus as unknown as { name: string }).name;
  log.info(
    `D-Bus API: ${DBUS_INTERFACE} at ${objectPath} as ${serviceName} (${uniqueName}) on the ${busLabel}`,
  );

  let closed: Promise<void> | null = null;
  return {
    serviceName,
    objectPath,
    uniqueName,
    emitEvent(json: string) {
      if (closing || lost) return;
      try {
        (iface as unknown as { Event(json: string): void }).Event(json);
      } catch (e) {
        // A bus going away must not stop the VMM.
        log.debug(`D-Bus API: cannot send the Event signal: ${describe(e)}`);
      }
    },
    close() {
      closed ??= (async () => {
        closing = true;
        // Replies under way (VmmShutdown's above all) go out before the connection does.
        await withTimeout(Promise.all([...inFlight]), opts.drainTimeoutMs ?? 5000).catch(() => {});
        try {
          bus.unexport(objectPath, iface);
        } catch { /* nothing exported */ }
        await disconnect();
      })();
      return closed;
    },
  };
}

interface NodeStream {
  destroyed?: boolean;
  once(event: "close", cb: () => void): void;
  destroy?(): void;
}

class TimeoutError extends Error {}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  return Promise.race([
    p,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new TimeoutError(`timed out after ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}
