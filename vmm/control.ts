/**
 * The VMM control loop: the single consumer of typed requests. The REST server, the CLI (and any later
 * front end) only build {@link VmmRequest}s; each carries its own reply callback and gets exactly one
 * reply, also when a handler throws. Requests are handled one at a time, in arrival order, so the VM
 * state machine below never sees two actions interleave.
 *
 * States: no VM → Created (config stored) → Running ⇄ Paused → Shutdown (backend released, config kept;
 * it can be booted again). Guest-initiated events (poweroff, reboot, triple fault) enter the same queue.
 */
import {
  type DeviceConfig,
  deviceIds,
  type DiskConfig,
  type FsConfig,
  type GenericVhostUserConfig,
  type NetConfig,
  parseWith,
  type PciDeviceInfo,
  type PmemConfig,
  type ReceiveMigrationData,
  type RestoreConfig,
  SchemaError,
  type SendMigrationData,
  type UserDeviceConfig,
  type VdpaConfig,
  type VmConfig,
  VmConfigSchema,
  type VmCoredumpData,
  type VmInfo,
  vmInfoConfig,
  type VmmPingResponse,
  type VmRemoveDevice,
  type VmResize,
  type VmResizeDisk,
  type VmResizeZone,
  type VmSnapshotConfig,
  type VmState,
  type VsockConfig,
  withBootIdentities,
} from "./vm_config.ts";
import { DVMM_VERSION } from "./version.ts";
import {
  type MigrationHooks,
  type MigrationStats,
  type MigrationUrl,
  parseMigrationUrl,
  type ReceivedMigration,
  receiveMigration,
} from "./migration.ts";
import {
  checkState,
  CONFIG_FILE,
  fileUrlPath,
  MEMORY_FILE,
  openMemory,
  type RestoreSource,
  type SnapshotState,
  STATE_FILE,
} from "./snapshot.ts";
import { type EventSink, nullEventSink } from "./events.ts";
import { closeFd } from "../ffi/socket.ts";
import { type Logger, logger } from "./log.ts";

// ---------------------------------------------------------------------------------------------------
// The VM backend contract (implemented by vmm/vm.ts)

export type GuestEvent = "poweroff" | "reboot" | "crash";

/** The device kinds that can be added at run time, named after their endpoint. */
export type HotplugKind =
  | "disk"
  | "net"
  | "fs"
  | "pmem"
  | "vsock"
  | "device"
  | "user-device"
  | "vdpa"
  | "generic-vhost-user";

export interface VmBackend {
  /** Create vCPUs and devices and start running; with `restore`, bring a snapshot back, paused. */
  boot(restore?: RestoreSource): Promise<void>;
  pause(): Promise<void>;
  resume(): Promise<void>;
  /** Stop vCPUs and release everything; idempotent. */
  shutdown(): Promise<void>;
  /** ACPI power button to the guest. */
  powerButton(): Promise<void>;
  nmi(): Promise<void>;
  counters(): Record<string, Record<string, number>>;
  /** As Cloud Hypervisor's DeviceNode map. */
  deviceTree(): Record<string, unknown>;
  memoryActualSize(): number;
  /**
   * Called once per guest-initiated event: "poweroff", "reboot" (reset register, keyboard controller,
   * triple fault) or "crash" (the VMM cannot go on running the guest).
   */
  onGuestEvent(cb: (e: GuestEvent) => void): void;
  /** Optional: hot-add a device to the running VM. Absent → the API answers "not implemented". */
  addDevice?(kind: HotplugKind, config: unknown): Promise<PciDeviceInfo>;
  /** Optional: hot-remove a device by identifier. */
  removeDevice?(id: string): Promise<void>;
  /** Optional: vCPUs running now. */
  vcpuCount?(): number;
  /** Optional: resize a memory zone of the running VM (vm.resize-zone, virtio-mem). */
  resizeZone?(id: string, size: number): Promise<void>;
  /** Optional: grow a disk of the running VM (vm.resize-disk). */
  resizeDisk?(id: string, size: number): Promise<void>;
  /** Optional: resize vCPUs / RAM / balloon of the running VM. */
  resize?(r: VmResize): Promise<void>;
  /** Optional: host input bytes (stdin in Tty mode) for the guest's serial port or console. */
  serialInput?(bytes: Uint8Array): void;
  /** Optional: the paused VM's state (vm.snapshot); guest memory is written into `dir` here. */
  snapshot?(dir: string): SnapshotState;
  /** Optional: an ELF core of the paused guest at `path` (vm.coredump). */
  coredump?(path: string): number;
  /** Optional: send the running VM to another dvmm (vm.send-migration); on failure it runs on. */
  sendMigration?(opts: SendMigrationData, config: unknown, hooks?: MigrationHooks): Promise<MigrationStats>;
}

export type VmBackendFactory = (config: VmConfig) => VmBackend;

// ---------------------------------------------------------------------------------------------------
// Requests and responses

/** Why a request failed; the REST server turns this into a status code. */
export type VmmErrorKind =
  | "NotCreated" // no VM (404)
  | "WrongState" // the VM is not in a state that allows the action (405)
  | "BadRequest" // the request is invalid (400)
  | "Conflict" // a device with that identifier already exists (409)
  | "NotFound" // no device / zone with that identifier (404)
  | "TooManyRequests" // a previous resize is still pending (429)
  | "NotImplemented" // dvmm cannot do this yet (500)
  | "ShuttingDown" // the VMM is exiting (500)
  | "Internal"; // the action failed (500)

export class VmmError extends Error {
  readonly messages: string[];
  constructor(readonly kind: VmmErrorKind, messages: string | string[]) {
    const list = Array.isArray(messages) ? messages : [messages];
    super(list.join(": "));
    this.name = "VmmError";
    this.messages = list;
  }
}

export type VmmResponse =
  | { ok: true; body?: unknown }
  | { ok: false; error: { kind: VmmErrorKind; messages: string[] } };

/** The body each request kind carries (already validated by the front end). */
export interface RequestBodies {
  "vmm.ping": undefined;
  "vmm.shutdown": undefined;
  "vm.create": VmConfig;
  "vm.boot": undefined;
  "vm.delete": undefined;
  "vm.shutdown": undefined;
  "vm.reboot": undefined;
  "vm.power-button": undefined;
  "vm.pause": undefined;
  "vm.resume": undefined;
  "vm.info": undefined;
  "vm.counters": undefined;
  "vm.nmi": undefined;
  "vm.add-disk": DiskConfig;
  "vm.add-net": NetConfig;
  "vm.add-fs": FsConfig;
  "vm.add-pmem": PmemConfig;
  "vm.add-vsock": VsockConfig;
  "vm.add-device": DeviceConfig;
  "vm.add-user-device": UserDeviceConfig;
  "vm.add-vdpa": VdpaConfig;
  "vm.add-generic-vhost-user": GenericVhostUserConfig;
  "vm.remove-device": VmRemoveDevice;
  "vm.resize": VmResize;
  "vm.resize-zone": VmResizeZone;
  "vm.resize-disk": VmResizeDisk;
  "vm.snapshot": VmSnapshotConfig;
  "vm.coredump": VmCoredumpData;
  "vm.restore": RestoreConfig;
  "vm.receive-migration": ReceiveMigrationData;
  "vm.send-migration": SendMigrationData;
}

export type RequestKind = keyof RequestBodies;
export type ReplyFn = (r: VmmResponse) => void;

export type VmmRequest = {
  [K in RequestKind]: { kind: K; body: RequestBodies[K]; reply: ReplyFn };
}[RequestKind];

interface GuestEventItem {
  kind: "guest-event";
  event: GuestEvent;
  generation: number;
}

type QueueItem = VmmRequest | GuestEventItem;

/** Requests that read state only: they never wait behind a long action. */
const READ_ONLY = new Set<RequestKind>(["vmm.ping", "vm.info", "vm.counters"]);

/** Where each hot-pluggable kind lives in VmConfig. */
const DEVICE_LISTS: Record<HotplugKind, keyof VmConfig> = {
  "disk": "disks",
  "net": "net",
  "fs": "fs",
  "pmem": "pmem",
  "vsock": "vsock",
  "device": "devices",
  "user-device": "user_devices",
  "vdpa": "vdpa",
  "generic-vhost-user": "generic_vhost_user",
};

export interface ControlLoopOptions {
  factory: VmBackendFactory;
  events?: EventSink;
  log?: Logger;
  /** `--no-shutdown`: a guest power-off shuts the VM down but the VMM keeps running (and serving). */
  noShutdown?: boolean;
  /** Starts the threads a VM of this config will need, ahead of its start (a migration's receiver). */
  prewarm?: (config: VmConfig) => void;
  /** Ends what `prewarm` started and nobody used. */
  drainPrewarmed?: () => void;
}

// ---------------------------------------------------------------------------------------------------

export class ControlLoop {
  readonly #factory: VmBackendFactory;
  readonly #events: EventSink;
  readonly #log: Logger;
  readonly #noShutdown: boolean;
  readonly #prewarmHook?: (config: VmConfig) => void;
  readonly #drainHook?: () => void;
  readonly #queue: QueueItem[] = [];
  #draining = false;

  #config: VmConfig | null = null;
  #state: VmState = "Created";
  #backend: VmBackend | null = null;
  /** Bumped for every backend so events from a released one are ignored. */
  #generation = 0;
  /** Where generated device identifiers go on (`_disk0`, `_net1`, …); never goes back for a VM. */
  #deviceCounter = 0;

  /** The cancellable action under way (a migration), which vmm.shutdown cancels. */
  #long: { what: string; abort: AbortController } | null = null;

  #exiting = false;
  #resolveExit!: (code: number) => void;
  /** Resolves with the process exit code once the VMM has shut down (API request or guest poweroff). */
  readonly exited: Promise<number>;

  constructor(opts: ControlLoopOptions) {
    this.#factory = opts.factory;
    this.#events = opts.events ?? nullEventSink;
    this.#log = opts.log ?? logger("control");
    this.#noShutdown = opts.noShutdown ?? false;
    this.#prewarmHook = opts.prewarm;
    this.#drainHook = opts.drainPrewarmed;
    this.exited = new Promise((resolve) => (this.#resolveExit = resolve));
  }

  /** The current VM state, or null when no VM is created (for tests and diagnostics). */
  get state(): VmState | null {
    return this.#config ? this.#state : null;
  }

  /**
   * Queue a request; its reply callback is called exactly once. Requests that only read state
   * (`vmm.ping`, `vm.info`, `vm.counters`) are answered at once, also while a long action (a boot) is
   * under way, so a slow boot never makes the VMM look dead.
   */
  submit(req: VmmRequest): void {
    if (req.kind === "vmm.shutdown" && this.#long) {
      // A migration may wait for its peer for ever: the shutdown (API, SIGTERM, SIGINT) cancels it.
      this.#log.info(`cancelling the ${this.#long.what}: the VMM is shutting down`);
      this.#long.abort.abort();
    }
    if (READ_ONLY.has(req.kind)) {
      this.#handleRequest(req);
      return;
    }
    this.#queue.push(req);
    this.#drain();
  }

  /** Convenience: submit and wait for the reply. */
  request<K extends RequestKind>(
    kind: K,
    ...body: RequestBodies[K] extends undefined ? [] : [RequestBodies[K]]
  ) {
    return new Promise<VmmResponse>((resolve) => {
      this.submit({ kind, body: body[0], reply: resolve } as VmmRequest);
    });
  }

  async #drain(): Promise<void> {
    if (this.#draining) return;
    this.#draining = true;
    try {
      while (this.#queue.length > 0) {
        const item = this.#queue.shift()!;
        if (item.kind === "guest-event") await this.#handleGuestEvent(item);
        else await this.#handleRequest(item);
      }
    } finally {
      this.#draining = false;
    }
  }

  async #handleRequest(req: VmmRequest): Promise<void> {
    let replied = false;
    const reply = (r: VmmResponse) => {
      if (replied) return;
      replied = true;
      try {
        req.reply(r);
      } catch (e) {
        this.#log.warn(`reply to ${req.kind} failed: ${(e as Error).message}`);
      }
    };
    try {
      if (this.#exiting) throw new VmmError("ShuttingDown", "the VMM is shutting down");
      this.#log.debug(`request ${req.kind}`);
      const body = await this.#dispatch(req);
      reply({ ok: true, body });
    } catch (e) {
      reply({ ok: false, error: toErrorPayload(e) });
      if (!(e instanceof VmmError)) this.#log.error(`${req.kind} failed: ${(e as Error)?.stack ?? e}`);
      else this.#log.info(`${req.kind}: ${e.message}`);
    }
  }

  // -------------------------------------------------------------------------------------------------
  // Preconditions

  #requireCreated(): VmConfig {
    if (!this.#config) throw new VmmError("NotCreated", "the VM is not created");
    return this.#config;
  }

  #requireBooted(action: string): VmBackend {
    this.#requireCreated();
    if ((this.#state !== "Running" && this.#state !== "Paused") || !this.#backend) {
      throw new VmmError("WrongState", `cannot ${action}: the VM is not booted (state ${this.#state})`);
    }
    return this.#backend;
  }

  #isBooted(): boolean {
    return this.#backend !== null && (this.#state === "Running" || this.#state === "Paused");
  }

  // -------------------------------------------------------------------------------------------------

  #dispatch(req: VmmRequest): Promise<unknown> | unknown {
    switch (req.kind) {
      case "vmm.ping":
        return this.#ping();
      case "vmm.shutdown":
        return this.#vmmShutdown(0);
      case "vm.create":
        return this.#create(req.body);
      case "vm.boot":
        return this.#boot();
      case "vm.delete":
        return this.#delete();
      case "vm.shutdown":
        return this.#shutdown();
      case "vm.reboot":
        this.#requireBooted("reboot");
        return this.#reboot();
      case "vm.power-button":
        return this.#requireBooted("press the power button").powerButton();
      case "vm.pause":
        return this.#pause();
      case "vm.resume":
        return this.#resume();
      case "vm.info":
        return this.#info();
      case "vm.counters":
        return this.#requireBooted("read counters").counters();
      case "vm.nmi":
        return this.#requireBooted("inject an NMI").nmi();
      case "vm.add-disk":
        return this.#addDevice("disk", req.body);
      case "vm.add-net":
        return this.#addDevice("net", req.body);
      case "vm.add-fs":
        return this.#addDevice("fs", req.body);
      case "vm.add-pmem":
        return this.#addDevice("pmem", req.body);
      case "vm.add-vsock":
        return this.#addDevice("vsock", req.body);
      case "vm.add-device":
        return this.#addDevice("device", req.body);
      case "vm.add-user-device":
        return this.#addDevice("user-device", req.body);
      case "vm.add-vdpa":
        return this.#addDevice("vdpa", req.body);
      case "vm.add-generic-vhost-user":
        return this.#addDevice("generic-vhost-user", req.body);
      case "vm.remove-device":
        return this.#removeDevice(req.body.id);
      case "vm.resize":
        return this.#resize(req.body);
      case "vm.resize-zone":
        return this.#resizeZone(req.body);
      case "vm.resize-disk":
        return this.#resizeDisk(req.body);
      case "vm.snapshot":
        return this.#snapshot(req.body.destination_url);
      case "vm.coredump":
        return this.#coredump(req.body.destination_url);
      case "vm.restore":
        return this.#restore(req.body);
      case "vm.receive-migration":
        return this.#receiveMigration(req.body);
      case "vm.send-migration":
        return this.#sendMigration(req.body);
      default: {
        const never: never = req;
        throw new VmmError("BadRequest", `unknown request ${(never as { kind: string }).kind}`);
      }
    }
  }

  #ping(): VmmPingResponse {
    return {
      build_version: `dvmm ${DVMM_VERSION} (Deno ${Deno.version.deno})`,
      version: DVMM_VERSION,
      pid: Deno.pid,
      features: ["dbus_api", "kvm"],
    };
  }

  async #vmmShutdown(code: number): Promise<void> {
    if (this.#config) await this.#deleteVm();
    this.#events.emit("vmm", "shutdown");
    this.#exiting = true;
    // Fail whatever is still queued so every request gets its reply.
    for (const item of this.#queue.splice(0)) {
      if (item.kind !== "guest-event") {
        try {
          item.reply({ ok: false, error: { kind: "ShuttingDown", messages: ["the VMM is shutting down"] } });
        } catch { /* a dead client */ }
      }
    }
    this.#resolveExit(code);
  }

  #create(config: VmConfig): void {
    if (this.#config) throw new VmmError("WrongState", "the VM is already created");
    this.#config = revalidate(config);
    this.#state = "Created";
    this.#events.emit("vm", "created");
  }

  async #startBackend(restore?: RestoreSource): Promise<void> {
    // What boot decides (device identifiers, MACs) is part of the VM's config from here on, so that
    // vm.info, counters, the device tree and remove-device all name devices the same way.
    const named = withBootIdentities(this.#config!, this.#deviceCounter);
    this.#config = named.config;
    this.#deviceCounter = named.counter;
    const config = this.#config;
    let backend: VmBackend;
    try {
      backend = this.#factory(config);
    } catch (e) {
      throw new VmmError("Internal", ["failed to create the VM", errorText(e)]);
    }
    const generation = ++this.#generation;
    backend.onGuestEvent((event) => {
      this.#queue.push({ kind: "guest-event", event, generation });
      this.#drain();
    });
    try {
      await backend.boot(restore);
    } catch (e) {
      try {
        await backend.shutdown();
      } catch (e2) {
        this.#log.warn(`releasing a VM that failed to boot: ${errorText(e2)}`);
      }
      throw new VmmError("Internal", [
        restore ? "failed to restore the VM" : "failed to boot the VM",
        errorText(e),
      ]);
    }
    this.#backend = backend;
    this.#state = restore ? "Paused" : "Running";
  }

  async #boot(): Promise<void> {
    this.#requireCreated();
    if (this.#isBooted()) throw new VmmError("WrongState", `the VM is already booted (state ${this.#state})`);
    this.#events.emit("vm", "booting");
    await this.#startBackend();
    this.#events.emit("vm", "booted");
  }

  async #stopBackend(): Promise<void> {
    const backend = this.#backend;
    this.#backend = null;
    this.#generation++;
    this.#state = "Shutdown";
    if (backend) await backend.shutdown();
  }

  async #shutdown(): Promise<void> {
    this.#requireBooted("shut down");
    await this.#stopBackend();
    this.#events.emit("vm", "shutdown");
  }

  async #reboot(): Promise<void> {
    this.#events.emit("vm", "rebooting");
    try {
      await this.#stopBackend();
    } catch (e) {
      throw new VmmError("Internal", ["failed to reboot the VM: releasing the old VM failed", errorText(e)]);
    }
    await this.#startBackend();
    this.#events.emit("vm", "rebooted");
  }

  async #pause(): Promise<void> {
    const backend = this.#requireBooted("pause");
    if (this.#state === "Paused") throw new VmmError("WrongState", "the VM is already paused");
    this.#events.emit("vm", "pausing");
    await backend.pause();
    this.#state = "Paused";
    this.#events.emit("vm", "paused");
  }

  async #resume(): Promise<void> {
    const backend = this.#requireBooted("resume");
    if (this.#state !== "Paused") throw new VmmError("WrongState", "cannot resume: the VM is not paused");
    this.#events.emit("vm", "resuming");
    await backend.resume();
    this.#state = "Running";
    this.#events.emit("vm", "resumed");
  }

  async #deleteVm(): Promise<void> {
    if (this.#isBooted()) {
      await this.#stopBackend();
      this.#events.emit("vm", "shutdown");
    }
    closeNetFds(this.#config);
    this.#config = null;
    this.#deviceCounter = 0;
    this.#state = "Created";
    this.#events.emit("vm", "deleted");
  }

  async #delete(): Promise<void> {
    if (!this.#config) return; // nothing to delete is not an error (as in Cloud Hypervisor)
    await this.#deleteVm();
  }

  #info(): VmInfo {
    const config = this.#requireCreated();
    const info: VmInfo = { config: vmInfoConfig(config) as VmConfig, state: this.#state };
    if (this.#isBooted()) {
      info.memory_actual_size = this.#backend!.memoryActualSize();
      info.device_tree = this.#backend!.deviceTree();
    } else {
      info.memory_actual_size = config.memory.size + (config.memory.hotplugged_size ?? 0);
    }
    return info;
  }

  // -------------------------------------------------------------------------------------------------
  // Devices and resizing

  async #addDevice(kind: HotplugKind, device: { id?: string }): Promise<PciDeviceInfo | undefined> {
    const config = this.#requireCreated();
    if (device.id !== undefined) {
      const clash = deviceIds(config).find((d) => d.id === device.id);
      if (clash) {
        throw new VmmError(
          "Conflict",
          `a device with identifier '${device.id}' already exists (${clash.where})`,
        );
      }
    }
    const key = DEVICE_LISTS[kind];
    if (kind === "vsock" && config.vsock) throw new VmmError("Conflict", "the VM already has a vsock device");
    const next = structuredClone(config) as Record<string, unknown>;
    if (kind === "vsock") next[key] = device;
    else next[key] = [...((next[key] as unknown[] | undefined) ?? []), device];
    const validated = revalidate(next as VmConfig);

    if (!this.#isBooted()) {
      // Cold plug: the device joins the configuration and is built at boot.
      this.#config = validated;
      return undefined;
    }
    const backend = this.#backend!;
    if (!backend.addDevice) throw notImplemented(`hot-adding ${kind} devices`);
    if (this.#state === "Paused") {
      throw new VmmError("WrongState", "cannot hot-add a device while the VM is paused: resume it first");
    }
    // Named as boot names devices (`_disk3`, …), from the same counter.
    const named = withBootIdentities(validated, this.#deviceCounter);
    const list = named.config[key] as unknown;
    const added = Array.isArray(list) ? list[list.length - 1] : list;
    const info = await backend.addDevice(kind, added);
    this.#deviceCounter = named.counter;
    this.#config = named.config;
    return info;
  }

  async #removeDevice(id: string): Promise<void> {
    const config = this.#requireCreated();
    if (!deviceIds(config).some((d) => d.id === id)) {
      throw new VmmError("NotFound", `no device with identifier '${id}'`);
    }
    const next = withoutDevice(config, id);
    if (next === null) throw new VmmError("BadRequest", `device '${id}' cannot be removed`);
    if (!this.#isBooted()) {
      closeNetFds({ net: config.net?.filter((n) => n.id === id) });
      this.#config = next;
      return;
    }
    const backend = this.#backend!;
    if (!backend.removeDevice) throw notImplemented("hot-removing devices");
    if (this.#state === "Paused") {
      throw new VmmError("WrongState", "cannot remove a device while the VM is paused: resume it first");
    }
    const node = backend.deviceTree()[`_virtio-pci-${id}`] as { pci_bdf?: string } | undefined;
    await backend.removeDevice(id);
    closeNetFds({ net: config.net?.filter((n) => n.id === id) });
    this.#config = next;
    this.#events.emit("vm", "device-removed", { id, bdf: node?.pci_bdf ?? "" });
  }

  async #resize(r: VmResize): Promise<void> {
    const config = this.#requireCreated();
    if (r.desired_vcpus !== undefined && r.desired_vcpus > config.cpus.max_vcpus) {
      throw new VmmError(
        "BadRequest",
        `desired_vcpus (${r.desired_vcpus}) exceeds max_vcpus (${config.cpus.max_vcpus})`,
      );
    }
    if (r.desired_balloon !== undefined && !config.balloon) {
      throw new VmmError("BadRequest", "desired_balloon needs a balloon device in the VM configuration");
    }
    const next = structuredClone(config);
    if (r.desired_vcpus !== undefined) next.cpus.boot_vcpus = r.desired_vcpus;
    if (r.desired_ram !== undefined) {
      // As Cloud Hypervisor: ACPI hotplug makes the new size the memory size (the next boot's); with
      // virtio-mem the boot size stays and the difference is `hotplugged_size`.
      const m = next.memory;
      if (this.#isBooted() && m.hotplug_method === "VirtioMem" && m.hotplug_size) {
        m.hotplugged_size = r.desired_ram > m.size ? r.desired_ram - m.size : undefined;
      } else {
        m.size = r.desired_ram;
      }
    }
    if (r.desired_balloon !== undefined) next.balloon!.size = r.desired_balloon;
    const validated = revalidate(next);
    if (!this.#isBooted()) {
      this.#config = validated;
      return;
    }
    const backend = this.#backend!;
    if (!backend.resize) throw notImplemented("resizing a running VM");
    if (
      this.#state === "Paused" && r.desired_vcpus !== undefined && r.desired_vcpus !== config.cpus.boot_vcpus
    ) {
      throw new VmmError("WrongState", "cannot change the vCPUs while the VM is paused: resume it first");
    }
    this.#events.emit("vm", "resizing");
    try {
      await backend.resize(r);
    } catch (e) {
      // A vCPU resize that stopped half-way (the guest gave up one vCPU, not the next): the config says
      // how many run now, so vm.info and the next boot agree with the VM.
      const running = backend.vcpuCount?.();
      if (running !== undefined && running !== config.cpus.boot_vcpus) {
        const now = structuredClone(config);
        now.cpus.boot_vcpus = running;
        this.#config = revalidate(now);
      }
      throw e;
    }
    this.#config = validated;
    this.#events.emit("vm", "resized");
  }

  async #resizeZone(r: VmResizeZone): Promise<void> {
    const config = this.#requireCreated();
    const zone = config.memory.zones?.find((z) => z.id === r.id);
    if (!zone) throw new VmmError("NotFound", `no memory zone with identifier '${r.id}'`);
    const next = structuredClone(config);
    const z = next.memory.zones!.find((z) => z.id === r.id)!;
    if (this.#isBooted()) {
      // As Cloud Hypervisor: the zone's virtio-mem device is asked for the new size; the difference from
      // the zone's boot size is its hotplugged_size.
      const backend = this.#backend!;
      if (!backend.resizeZone) throw notImplemented("resizing memory zones of a running VM");
      await backend.resizeZone(r.id, r.desired_ram);
      z.hotplugged_size = r.desired_ram > z.size ? r.desired_ram - z.size : undefined;
    } else {
      z.size = r.desired_ram;
    }
    this.#config = revalidate(next);
  }

  async #resizeDisk(r: VmResizeDisk): Promise<void> {
    const config = this.#requireCreated();
    if (!config.disks?.some((d) => d.id === r.id)) {
      throw new VmmError("NotFound", `no disk with identifier '${r.id}'`);
    }
    // As Cloud Hypervisor: the disk of a running VM (its image is open and the guest is told).
    this.#requireBooted("resize a disk");
    const backend = this.#backend!;
    if (!backend.resizeDisk) throw notImplemented("resizing disks");
    await backend.resizeDisk(r.id, r.desired_size);
  }

  #requirePaused(action: string): VmBackend {
    const backend = this.#requireBooted(action);
    if (this.#state !== "Paused") {
      throw new VmmError("WrongState", `cannot ${action}: the VM must be paused first`);
    }
    return backend;
  }

  // -------------------------------------------------------------------------------------------------
  // Snapshot, restore, coredump

  /** vm.snapshot: config.json, state.json and the memory file into the destination directory. */
  async #snapshot(url: string): Promise<void> {
    const backend = this.#requirePaused("snapshot");
    if (!backend.snapshot) throw notImplemented("VM snapshots");
    const dir = this.#localPath(url, "destination_url");
    try {
      await Deno.mkdir(dir, { recursive: true });
    } catch (e) {
      throw new VmmError("Internal", [`cannot create the snapshot directory ${dir}`, errorText(e)]);
    }
    this.#events.emit("vm", "snapshotting");
    let state: SnapshotState;
    try {
      state = backend.snapshot(dir);
      await Deno.writeTextFile(`${dir}/${CONFIG_FILE}`, JSON.stringify(savedConfig(this.#config!), null, 1));
      await Deno.writeTextFile(`${dir}/${STATE_FILE}`, JSON.stringify(state));
    } catch (e) {
      if (e instanceof VmmError) throw e;
      throw new VmmError("Internal", ["the VM could not be snapshotted", errorText(e)]);
    }
    this.#events.emit("vm", "snapshotted");
  }

  /**
   * vm.send-migration: the running VM goes to another dvmm (pre-copy, then its state); once the
   * destination runs it, this VM is shut down and the VMM exits. On failure the VM runs on here.
   */
  async #sendMigration(opts: SendMigrationData): Promise<void> {
    const backend = this.#requireBooted("send a migration");
    if (this.#state !== "Running") {
      throw new VmmError("WrongState", "cannot send a migration: the VM must be running (resume it first)");
    }
    if (!backend.sendMigration) throw notImplemented("sending a live migration");
    if (opts.memory_mode === "Postcopy") throw notImplemented("post-copy migration (memory_mode Postcopy)");
    if (opts.tls_dir !== undefined) throw notImplemented("migration over TLS (tls_dir)");
    if (opts.connections > 1) throw notImplemented("migration over several connections (connections > 1)");
    if (opts.preserve_source) {
      throw notImplemented("keeping the source VM after a migration (preserve_source)");
    }
    // Cloud Hypervisor's migration events, with its names.
    this.#events.emit("vm", "migration-started");
    let stats: MigrationStats;
    try {
      stats = await this.#cancellable(
        "migration being sent",
        (signal) =>
          backend.sendMigration!(opts, savedConfig(this.#config!), {
            signal,
            onIteration: (n) => this.#events.emit("vm", "migration-memory-iteration", { id: String(n) }),
          }),
      );
    } catch (e) {
      this.#events.emit("vm", "migration-failed");
      if (e instanceof VmmError) throw e;
      throw new VmmError("Internal", ["the VM migration could not be sent", errorText(e)]);
    }
    this.#log.info(
      `migration sent: ${stats.rounds} round(s), ${Math.round(stats.bytes / 2 ** 20)} MiB, ` +
        `${stats.totalMs.toFixed(0)} ms in all, ${stats.downtimeMs.toFixed(0)} ms paused`,
    );
    this.#events.emit("vm", "migration-finished", {
      rounds: String(stats.rounds),
      bytes: String(stats.bytes),
      total_ms: stats.totalMs.toFixed(0),
      downtime_ms: stats.downtimeMs.toFixed(0),
    });
    // The VM lives on at the destination: this one ends, and so does the VMM (as Cloud Hypervisor's).
    queueMicrotask(() => this.submit({ kind: "vmm.shutdown", body: undefined, reply: () => {} }));
  }

  /**
   * vm.receive-migration: waits on the receiver URL for one migration, then brings the VM up from what
   * arrived (the restore path) and runs it; the sender hears the outcome.
   */
  async #receiveMigration(r: ReceiveMigrationData): Promise<void> {
    if (this.#config) {
      throw new VmmError("WrongState", "cannot receive a migration: a VM is already created");
    }
    if (r.memory_mode === "Postcopy") throw notImplemented("post-copy migration (memory_mode Postcopy)");
    if (r.tls_dir !== undefined) throw notImplemented("migration over TLS (tls_dir)");
    if (r.vfio_fds?.length || r.iommufd_fd !== undefined) {
      throw notImplemented("receiving VFIO devices (vfio_fds, iommufd_fd)");
    }
    if ((r.zone_updates ?? []).length > 0) throw notImplemented("zone_updates (host NUMA nodes)");
    let url: MigrationUrl;
    try {
      url = parseMigrationUrl(r.receiver_url, "receiver_url");
    } catch (e) {
      throw new VmmError("BadRequest", errorText(e));
    }
    let got: ReceivedMigration;
    try {
      got = await this.#cancellable("migration being received", (signal) =>
        receiveMigration(url, {
          signal,
          onReady: () => this.#events.emit("vm", "migration-receive-ready"),
          onConfig: (config) => {
            this.#events.emit("vm", "migration-receive-started");
            // The VM's workers start while its memory arrives (each is an isolate that takes long to load).
            this.#prewarm(config as VmConfig);
          },
        }));
    } catch (e) {
      this.#events.emit("vm", "migration-receive-failed");
      this.#drainWorkers();
      throw new VmmError("Internal", ["the VM migration could not be received", errorText(e)]);
    }
    try {
      const config = revalidate(withRestoredNets(got.config as VmConfig, []));
      const state = checkState(got.state, "the migration");
      await this.#startSaved(config, {
        state,
        memoryFd: got.memfd,
        onDemand: true,
        prefault: false,
        memfds: got.memfds,
      });
      await this.#resume();
    } catch (e) {
      const why = errorText(e);
      if (this.#backend) await this.#stopBackend().catch(() => {});
      this.#config = null;
      this.#state = "Created";
      await got.answer(false, why).catch(() => {});
      this.#events.emit("vm", "migration-receive-failed");
      throw e instanceof VmmError
        ? e
        : new VmmError("Internal", ["the VM migration could not be received", why]);
    } finally {
      if (got.memfd >= 0) closeFd(got.memfd);
      this.#drainWorkers();
    }
    await got.answer(true).catch((e) => this.#log.warn(`telling the sender: ${errorText(e)}`));
    this.#events.emit("vm", "migration-receive-finished");
  }

  /** Runs a long action that a vmm.shutdown arriving meanwhile cancels (through `signal`). */
  async #cancellable<T>(what: string, action: (signal: AbortSignal) => Promise<T>): Promise<T> {
    const long = { what, abort: new AbortController() };
    this.#long = long;
    try {
      return await action(long.abort.signal);
    } finally {
      if (this.#long === long) this.#long = null;
    }
  }

  #prewarm(config: VmConfig): void {
    try {
      this.#prewarmHook?.(revalidate(config));
    } catch (e) {
      this.#log.debug(`no head start for the received VM: ${errorText(e)}`);
    }
  }

  #drainWorkers(): void {
    this.#drainHook?.();
  }

  /** Restore and migration: the saved VM becomes this loop's VM and is brought up from `source`, paused. */
  async #startSaved(config: VmConfig, source: RestoreSource): Promise<void> {
    this.#config = config;
    this.#state = "Created";
    this.#deviceCounter = nextDeviceCounter(config);
    await this.#startBackend(source);
  }

  /** vm.coredump: an ELF core of the paused guest. */
  async #coredump(url: string): Promise<void> {
    const backend = this.#requirePaused("coredump");
    if (!backend.coredump) throw notImplemented("VM coredumps");
    const path = this.#localPath(url, "destination_url");
    try {
      await Promise.resolve(backend.coredump(path));
    } catch (e) {
      if (e instanceof VmmError) throw e;
      throw new VmmError("Internal", ["the guest could not be dumped", errorText(e)]);
    }
  }

  #localPath(url: string, field: string): string {
    try {
      return fileUrlPath(url, field);
    } catch (e) {
      throw new VmmError("BadRequest", errorText(e));
    }
  }

  /**
   * vm.restore: the VM of a snapshot, brought back paused (running with `resume`). Taps given as
   * descriptors at snapshot time must be given again (`net_fds`), one entry per such device.
   */
  async #restore(r: RestoreConfig): Promise<void> {
    // On failure the descriptors in net_fds stay the caller's (the API front end closes them).
    if (this.#config) {
      throw new VmmError("WrongState", "cannot restore: a VM is already created; delete it first");
    }
    let config: VmConfig;
    let state: SnapshotState;
    let memoryFd = -1;
    try {
      if (r.vfio_fds?.length || r.iommufd_fd !== undefined) {
        throw new VmmError(
          "NotImplemented",
          "restoring VFIO devices (vfio_fds, iommufd_fd) is not implemented in dvmm yet",
        );
      }
      if ((r.zone_updates ?? []).length > 0) {
        throw new VmmError("NotImplemented", "zone_updates (host NUMA nodes) is not implemented in dvmm yet");
      }
      const dir = this.#localPath(r.source_url, "source_url");
      let saved: unknown;
      try {
        saved = JSON.parse(await Deno.readTextFile(`${dir}/${CONFIG_FILE}`));
        state = checkState(JSON.parse(await Deno.readTextFile(`${dir}/${STATE_FILE}`)), dir);
      } catch (e) {
        throw new VmmError("BadRequest", [`cannot read the snapshot in ${dir}`, errorText(e)]);
      }
      config = revalidate(withRestoredNets(saved as VmConfig, r.net_fds ?? []));
      memoryFd = openMemory(`${dir}/${MEMORY_FILE}`);
    } catch (e) {
      if (memoryFd >= 0) closeFd(memoryFd);
      throw e instanceof VmmError ? e : new VmmError("Internal", ["cannot restore the VM", errorText(e)]);
    }
    this.#events.emit("vm", "restoring");
    const source: RestoreSource = {
      state,
      memoryFd,
      onDemand: r.memory_restore_mode === "OnDemand",
      prefault: r.prefault,
    };
    try {
      await this.#startSaved(config, source);
    } catch (e) {
      this.#config = null;
      throw e;
    } finally {
      closeFd(memoryFd);
    }
    this.#events.emit("vm", "restored");
    if (r.resume) await this.#resume();
  }

  // -------------------------------------------------------------------------------------------------
  // Guest-initiated events

  async #handleGuestEvent(item: GuestEventItem): Promise<void> {
    if (item.generation !== this.#generation || !this.#isBooted() || this.#exiting) {
      this.#log.debug(`ignoring guest ${item.event} from a released VM`);
      return;
    }
    try {
      switch (item.event) {
        case "poweroff":
          // Cloud Hypervisor ends the VMM when the guest powers off, API socket or not, unless it was
          // started with --no-shutdown: then only the VM shuts down.
          this.#log.info("guest powered off");
          if (this.#noShutdown) {
            await this.#stopBackend();
            this.#events.emit("vm", "shutdown");
          } else {
            await this.#vmmShutdown(0);
          }
          return;
        case "crash":
          // The VMM could not go on running the guest (an exit it cannot handle, a failed KVM_RUN, a
          // fault in a vCPU thread). Rebooting would repeat a deterministic failure forever: like
          // Cloud Hypervisor, end the VMM with an error. (A triple fault arrives as "reboot".)
          this.#log.error("the VM crashed: shutting the VMM down");
          await this.#vmmShutdown(1);
          return;
        case "reboot":
          this.#log.info("guest requested a reboot");
          await this.#reboot();
          return;
      }
    } catch (e) {
      this.#log.error(`handling guest ${item.event} failed: ${errorText(e)}`);
      if (item.event === "poweroff" && !this.#exiting) {
        this.#exiting = true;
        this.#resolveExit(1);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Helpers

/**
 * Taps handed to the VMM as descriptors belong to the config that names them (as Cloud Hypervisor's
 * preserved fds): they are closed when that config (or the device) goes away.
 */
function closeNetFds(config: { net?: { fds?: number[] }[] } | null): void {
  for (const n of config?.net ?? []) n.fds?.forEach(closeFd);
}

/** The config as a snapshot keeps it: descriptors are process-local, so a tap given as fds keeps its count. */
function savedConfig(config: VmConfig): VmConfig {
  const c = structuredClone(config);
  for (const n of c.net ?? []) {
    if (n.fds) (n as { fds?: number[]; num_fds?: number }).fds = n.fds.map(() => -1);
  }
  return c;
}

/** A restored config with the taps given again (`net_fds`) in place of the saved descriptors. */
function withRestoredNets(
  config: VmConfig,
  netFds: { id: string; num_fds: number; fds?: number[] }[],
): VmConfig {
  const given = new Map(netFds.map((n) => [n.id, n]));
  for (const n of config.net ?? []) {
    if (!n.fds) continue;
    const g = given.get(n.id ?? "");
    if (!g?.fds || g.fds.length === 0) {
      throw new VmmError(
        "BadRequest",
        `net '${n.id}' was given as ${n.fds.length} tap descriptor(s): restore needs them again (net_fds)`,
      );
    }
    n.fds = g.fds;
    given.delete(n.id!);
  }
  if (given.size > 0) {
    throw new VmmError(
      "BadRequest",
      `net_fds names no tap-descriptor net device: ${[...given.keys()].join(", ")}`,
    );
  }
  return config;
}

/** Where generated identifiers go on after a restored config's (`_disk3` → 4). */
function nextDeviceCounter(config: VmConfig): number {
  let next = 0;
  for (const d of deviceIds(config)) {
    const m = d.id.match(/^_[a-z_-]+?(\d+)$/);
    if (m) next = Math.max(next, Number(m[1]) + 1);
  }
  return next;
}

function notImplemented(what: string): VmmError {
  return new VmmError("NotImplemented", `${what} is not implemented in dvmm yet`);
}

function errorText(e: unknown): string {
  if (e instanceof VmmError) return e.messages.join(": ");
  return e instanceof Error ? e.message : String(e);
}

function toErrorPayload(e: unknown): { kind: VmmErrorKind; messages: string[] } {
  if (e instanceof VmmError) return { kind: e.kind, messages: e.messages };
  if (e instanceof SchemaError) return { kind: "BadRequest", messages: [`invalid ${e.what}`, ...e.problems] };
  return { kind: "Internal", messages: [errorText(e)] };
}

/** Check a whole configuration again (after a change made by the loop itself). */
function revalidate(config: VmConfig): VmConfig {
  try {
    return parseWith(VmConfigSchema, config, "VmConfig");
  } catch (e) {
    if (e instanceof SchemaError) {
      throw new VmmError("BadRequest", ["invalid VM configuration", ...e.problems]);
    }
    throw e;
  }
}

/** The configuration without the device called `id`; null when that device is not removable. */
function withoutDevice(config: VmConfig, id: string): VmConfig | null {
  const next = structuredClone(config) as Record<string, unknown>;
  for (const key of Object.values(DEVICE_LISTS)) {
    const v = next[key];
    if (Array.isArray(v)) {
      const kept = v.filter((d: { id?: string }) => d.id !== id);
      if (kept.length !== v.length) {
        next[key] = kept;
        return next as VmConfig;
      }
    } else if (v && typeof v === "object" && (v as { id?: string }).id === id) {
      delete next[key];
      return next as VmConfig;
    }
  }
  return null;
}
