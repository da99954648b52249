/**
 * Command-line spellings of the VM configuration (Cloud Hypervisor's `key=value,key=value` option
 * strings) turned into the same {@link VmConfig} the REST API accepts, validated by the same schema.
 * Used by `dvmm` itself and by `dvmm remote add-disk path=...` and friends.
 */
import type { z } from "zod";
import {
  type DeviceConfig,
  DeviceConfigSchema,
  type DiskConfig,
  DiskConfigSchema,
  formatZodError,
  type FsConfig,
  FsConfigSchema,
  type NetConfig,
  NetConfigSchema,
  type PmemConfig,
  PmemConfigSchema,
  type RestoreConfig,
  RestoreConfigSchema,
  type UserDeviceConfig,
  UserDeviceConfigSchema,
  type VdpaConfig,
  VdpaConfigSchema,
  type VmConfig,
  VmConfigSchema,
  type VsockConfig,
  VsockConfigSchema,
} from "./vm_config.ts";

/** A bad command-line value; the message names the option. */
export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}

// ---------------------------------------------------------------------------------------------------
// Scalars

const SIZE_UNITS: Record<string, number> = { "": 1, K: 1 << 10, M: 1 << 20, G: 1 << 30, T: 2 ** 40 };

/** `512M`, `1G`, `4096`, `2K` → bytes (binary units, as Cloud Hypervisor reads them). */
export function parseSize(text: string): number {
  const m = /^(\d+)([KMGT]?)(i?B)?$/i.exec(text.trim());
  if (!m) {
    throw new Error(`'${text}' is not a size (use a number of bytes with an optional K, M, G or T suffix)`);
  }
  const n = Number(m[1]) * SIZE_UNITS[m[2].toUpperCase()];
  if (!Number.isSafeInteger(n)) throw new Error(`size '${text}' is too large`);
  return n;
}

export function parseBool(text: string): boolean {
  switch (text.toLowerCase()) {
    case "on":
    case "true":
      return true;
    case "off":
    case "false":
      return false;
  }
  throw new Error(`'${text}' is not a boolean (use on or off)`);
}

export function parseInteger(text: string): number {
  const t = text.trim();
  const n = /^0x[0-9a-f]+$/i.test(t) ? parseInt(t, 16) : /^-?\d+$/.test(t) ? Number(t) : NaN;
  if (!Number.isSafeInteger(n)) throw new Error(`'${text}' is not an integer`);
  return n;
}

function parseIntList(text: string): number[] {
  const inner = text.startsWith("[") && text.endsWith("]") ? text.slice(1, -1) : text;
  if (inner.trim() === "") return [];
  return inner.split(/[,:]/).map(parseInteger);
}

// ---------------------------------------------------------------------------------------------------
// Option strings

/** Split `a=1,b=[2,3],c="x,y"` at the top-level commas. */
export function splitOptionString(value: string): string[] {
  const parts: string[] = [];
  let depth = 0;
  let quoted = false;
  let cur = "";
  for (const ch of value) {
    if (ch === '"') quoted = !quoted;
    else if (!quoted && ch === "[") depth++;
    else if (!quoted && ch === "]") depth--;
    if (ch === "," && depth === 0 && !quoted) {
      parts.push(cur);
      cur = "";
    } else {
      cur += ch;
    }
  }
  if (quoted || depth !== 0) throw new Error("unbalanced quotes or brackets");
  parts.push(cur);
  return parts.filter((p) => p !== "");
}

type Kind = "string" | "bool" | "int" | "size" | "intlist";
type Parsed = Record<string, string | number | boolean | number[]>;

/** Parse an option string against the keys it may contain; errors name the option and the key. */
export function parseOptionString(option: string, value: string, spec: Record<string, Kind>): Parsed {
  const out: Parsed = {};
  let parts: string[];
  try {
    parts = splitOptionString(value);
  } catch (e) {
    throw new ConfigError(`${option}: ${(e as Error).message} in '${value}'`);
  }
  if (parts.length === 0) throw new ConfigError(`${option}: empty value`);
  for (const part of parts) {
    const eq = part.indexOf("=");
    if (eq <= 0) {
      throw new ConfigError(
        `${option}: expected key=value, got '${part}' (known keys: ${Object.keys(spec).join(", ")})`,
      );
    }
    const key = part.slice(0, eq);
    let raw = part.slice(eq + 1);
    if (raw.length >= 2 && raw.startsWith('"') && raw.endsWith('"')) raw = raw.slice(1, -1);
    const kind = spec[key];
    if (!kind) {
      throw new ConfigError(`${option}: unknown parameter '${key}' (known: ${Object.keys(spec).join(", ")})`);
    }
    if (key in out) throw new ConfigError(`${option}: parameter '${key}' given twice`);
    try {
      switch (kind) {
        case "string":
          out[key] = raw;
          break;
        case "bool":
          out[key] = parseBool(raw);
          break;
        case "int":
          out[key] = parseInteger(raw);
          break;
        case "size":
          out[key] = parseSize(raw);
          break;
        case "intlist":
          out[key] = parseIntList(raw);
          break;
      }
    } catch (e) {
      throw new ConfigError(`${option}: ${key}: ${(e as Error).message}`);
    }
  }
  return out;
}

/** Copy parsed keys to config fields (renaming where the CLI spelling differs). */
function rename(p: Parsed, names: Record<string, string> = {}): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(p)) out[names[k] ?? k] = v;
  return out;
}

function validate<S extends z.ZodTypeAny>(option: string, schema: S, value: unknown): z.infer<S> {
  const r = schema.safeParse(value);
  if (!r.success) throw new ConfigError(`${option}: ${formatZodError(r.error, option).join("; ")}`);
  return r.data;
}

// ---------------------------------------------------------------------------------------------------
// Per-option parsers (returning schema input, not yet validated as part of a VM)

export function cpusFromOption(value: string): Record<string, unknown> {
  const p = parseOptionString("--cpus", value, {
    boot: "int",
    max: "int",
    topology: "string",
    kvm_hyperv: "bool",
    max_phys_bits: "int",
    nested: "bool",
  });
  const boot = (p.boot as number | undefined) ?? 1;
  const out: Record<string, unknown> = { boot_vcpus: boot, max_vcpus: (p.max as number | undefined) ?? boot };
  if (p.kvm_hyperv !== undefined) out.kvm_hyperv = p.kvm_hyperv;
  if (p.max_phys_bits !== undefined) out.max_phys_bits = p.max_phys_bits;
  if (p.nested !== undefined) out.nested = p.nested;
  if (p.topology !== undefined) {
    const t = String(p.topology).split(":");
    if (t.length !== 4) {
      throw new ConfigError(
        "--cpus: topology must be threads_per_core:cores_per_die:dies_per_package:packages",
      );
    }
    try {
      const [threads_per_core, cores_per_die, dies_per_package, packages] = t.map(parseInteger);
      out.topology = { threads_per_core, cores_per_die, dies_per_package, packages };
    } catch (e) {
      throw new ConfigError(`--cpus: topology: ${(e as Error).message}`);
    }
  }
  return out;
}

export function memoryFromOption(value: string): Record<string, unknown> {
  const p = parseOptionString("--memory", value, {
    size: "size",
    mergeable: "bool",
    shared: "bool",
    hugepages: "bool",
    hugepage_size: "size",
    hotplug_size: "size",
    hotplugged_size: "size",
    hotplug_method: "string",
    prefault: "bool",
    thp: "bool",
  });
  const out = rename(p);
  if (out.size === undefined) out.size = 512 << 20;
  if (p.hotplug_method !== undefined) {
    const m = String(p.hotplug_method).toLowerCase();
    if (m === "acpi") out.hotplug_method = "Acpi";
    else if (m === "virtio-mem") out.hotplug_method = "VirtioMem";
    else {throw new ConfigError(
        `--memory: hotplug_method must be acpi or virtio-mem, got '${p.hotplug_method}'`,
      );}
  }
  return out;
}

/** `--serial`/`--console`: off | null | pty | tty | file=PATH | socket=PATH (serial only). */
export function consoleFromOption(option: "--serial" | "--console", value: string): Record<string, unknown> {
  const simple: Record<string, string> = { off: "Off", null: "Null", pty: "Pty", tty: "Tty" };
  const parts = splitOptionString(value);
  const first = parts[0]?.toLowerCase() ?? "";
  const out: Record<string, unknown> = {};
  let rest = parts.slice(1);
  if (simple[first]) {
    out.mode = simple[first];
  } else if (first.startsWith("file=")) {
    out.mode = "File";
    out.file = parts[0].slice(5);
  } else if (first.startsWith("socket=") && option === "--serial") {
    out.mode = "Socket";
    out.socket = parts[0].slice(7);
  } else {
    const allowed = option === "--serial"
      ? "off, null, pty, tty, file=PATH or socket=PATH"
      : "off, null, pty, tty or file=PATH";
    throw new ConfigError(`${option}: expected ${allowed}, got '${value}'`);
  }
  if (out.file === "" || out.socket === "") throw new ConfigError(`${option}: empty path`);
  if (option === "--console" && rest.length > 0) {
    const p = parseOptionString(option, rest.join(","), { iommu: "bool" });
    Object.assign(out, p);
    rest = [];
  }
  if (rest.length > 0) throw new ConfigError(`${option}: unexpected '${rest.join(",")}'`);
  return out;
}

const DISK_KEYS: Record<string, Kind> = {
  path: "string",
  readonly: "bool",
  direct: "bool",
  iommu: "bool",
  num_queues: "int",
  queue_size: "int",
  vhost_user: "bool",
  socket: "string",
  id: "string",
  serial: "string",
  pci_segment: "int",
  image_type: "string",
  sparse: "bool",
  backing_files: "bool",
  rate_limit_group: "string",
};

export function diskFromOption(value: string, option = "--disk"): Record<string, unknown> {
  const p = parseOptionString(option, value, DISK_KEYS);
  const out = rename(p, { socket: "vhost_socket" });
  if (p.image_type !== undefined) {
    const types: Record<string, string> = {
      raw: "Raw",
      qcow2: "Qcow2",
      vhd: "FixedVhd",
      fixedvhd: "FixedVhd",
      vhdx: "Vhdx",
    };
    const t = types[String(p.image_type).toLowerCase()];
    if (!t) throw new ConfigError(`${option}: image_type must be raw, qcow2, vhd or vhdx`);
    out.image_type = t;
  }
  return out;
}

const NET_KEYS: Record<string, Kind> = {
  tap: "string",
  ip: "string",
  mask: "string",
  mac: "string",
  host_mac: "string",
  mtu: "int",
  iommu: "bool",
  num_queues: "int",
  queue_size: "int",
  id: "string",
  vhost_user: "bool",
  socket: "string",
  vhost_mode: "string",
  fd: "intlist",
  offload_tso: "bool",
  offload_ufo: "bool",
  offload_csum: "bool",
  pci_segment: "int",
};

export function netFromOption(value: string, option = "--net"): Record<string, unknown> {
  const p = parseOptionString(option, value, NET_KEYS);
  const out = rename(p, { socket: "vhost_socket", fd: "fds" });
  if (p.vhost_mode !== undefined) {
    const m = String(p.vhost_mode).toLowerCase();
    if (m !== "client" && m !== "server") {
      throw new ConfigError(`${option}: vhost_mode must be client or server`);
    }
    out.vhost_mode = m === "client" ? "Client" : "Server";
  }
  return out;
}

export function rngFromOption(value: string): Record<string, unknown> {
  return rename(parseOptionString("--rng", value, { src: "string", iommu: "bool" }));
}

export function fsFromOption(value: string, option = "--fs"): Record<string, unknown> {
  return rename(parseOptionString(option, value, {
    tag: "string",
    socket: "string",
    num_queues: "int",
    queue_size: "int",
    id: "string",
    pci_segment: "int",
  }));
}

export function pmemFromOption(value: string, option = "--pmem"): Record<string, unknown> {
  return rename(parseOptionString(option, value, {
    file: "string",
    size: "size",
    iommu: "bool",
    discard_writes: "bool",
    id: "string",
    pci_segment: "int",
  }));
}

export function vsockFromOption(value: string, option = "--vsock"): Record<string, unknown> {
  return rename(parseOptionString(option, value, {
    cid: "int",
    socket: "string",
    iommu: "bool",
    id: "string",
    pci_segment: "int",
  }));
}

export function deviceFromOption(value: string, option = "--device"): Record<string, unknown> {
  return rename(
    parseOptionString(option, value, { path: "string", iommu: "bool", id: "string", pci_segment: "int" }),
  );
}

export function userDeviceFromOption(value: string, option = "--user-device"): Record<string, unknown> {
  return rename(parseOptionString(option, value, { socket: "string", id: "string", pci_segment: "int" }));
}

export function vdpaFromOption(value: string, option = "--vdpa"): Record<string, unknown> {
  return rename(parseOptionString(option, value, {
    path: "string",
    num_queues: "int",
    iommu: "bool",
    id: "string",
    pci_segment: "int",
  }));
}

// Validated single-device parsers (for `dvmm remote add-*`).

export const parseDiskConfig = (v: string, o = "add-disk"): DiskConfig =>
  validate(o, DiskConfigSchema, diskFromOption(v, o));
export const parseNetConfig = (v: string, o = "add-net"): NetConfig =>
  validate(o, NetConfigSchema, netFromOption(v, o));
export const parseFsConfig = (v: string, o = "add-fs"): FsConfig =>
  validate(o, FsConfigSchema, fsFromOption(v, o));
export const parsePmemConfig = (v: string, o = "add-pmem"): PmemConfig =>
  validate(o, PmemConfigSchema, pmemFromOption(v, o));
export const parseVsockConfig = (v: string, o = "add-vsock"): VsockConfig =>
  validate(o, VsockConfigSchema, vsockFromOption(v, o));
export const parseDeviceConfig = (v: string, o = "add-device"): DeviceConfig =>
  validate(o, DeviceConfigSchema, deviceFromOption(v, o));
export const parseUserDeviceConfig = (v: string, o = "add-user-device"): UserDeviceConfig =>
  validate(o, UserDeviceConfigSchema, userDeviceFromOption(v, o));
export const parseVdpaConfig = (v: string, o = "add-vdpa"): VdpaConfig =>
  validate(o, VdpaConfigSchema, vdpaFromOption(v, o));

export function parseRestoreConfig(value: string, option = "restore"): RestoreConfig {
  const p = parseOptionString(option, value, {
    source_url: "string",
    prefault: "bool",
    resume: "bool",
    memory_restore_mode: "string",
  });
  const out = rename(p);
  if (p.memory_restore_mode !== undefined) {
    const m = String(p.memory_restore_mode).toLowerCase();
    if (m === "copy") out.memory_restore_mode = "Copy";
    else if (m === "ondemand" || m === "on_demand") out.memory_restore_mode = "OnDemand";
    else throw new ConfigError(`${option}: memory_restore_mode must be copy or ondemand`);
  }
  return validate(option, RestoreConfigSchema, out);
}

// ---------------------------------------------------------------------------------------------------
// The whole VM

/** VM options as given on the command line (each repeatable option as a list). */
export interface CliVmOptions {
  cpus?: string;
  memory?: string;
  kernel?: string;
  firmware?: string;
  initramfs?: string;
  cmdline?: string;
  serial?: string;
  console?: string;
  disk?: string[];
  net?: string[];
  rng?: string;
  fs?: string[];
  pmem?: string[];
  vsock?: string;
  device?: string[];
  "user-device"?: string[];
  vdpa?: string[];
}

/** Whether any option describing a VM was given (otherwise dvmm only serves the API). */
export function hasVmOptions(o: CliVmOptions): boolean {
  return o.kernel !== undefined || o.firmware !== undefined;
}

const OPTION_OF_FIELD: Record<string, string> = {
  cpus: "--cpus",
  memory: "--memory",
  payload: "--kernel",
  disks: "--disk",
  net: "--net",
  rng: "--rng",
  serial: "--serial",
  console: "--console",
  fs: "--fs",
  pmem: "--pmem",
  vsock: "--vsock",
  devices: "--device",
  user_devices: "--user-device",
  vdpa: "--vdpa",
};

/** Build and validate the VM configuration described by the command line. */
export function vmConfigFromCli(o: CliVmOptions): VmConfig {
  if (o.kernel === undefined && o.firmware === undefined) {
    throw new ConfigError("--kernel (or --firmware) is required to describe a VM");
  }
  if (o.initramfs !== undefined && o.kernel === undefined) {
    throw new ConfigError("--initramfs needs --kernel");
  }
  const payload: Record<string, unknown> = {};
  if (o.kernel !== undefined) payload.kernel = o.kernel;
  if (o.firmware !== undefined) payload.firmware = o.firmware;
  if (o.initramfs !== undefined) payload.initramfs = o.initramfs;
  if (o.cmdline !== undefined) payload.cmdline = o.cmdline;

  const input: Record<string, unknown> = {
    cpus: cpusFromOption(o.cpus ?? "boot=1"),
    memory: memoryFromOption(o.memory ?? "size=512M"),
    payload,
    serial: consoleFromOption("--serial", o.serial ?? "null"),
    console: consoleFromOption("--console", o.console ?? "tty"),
    rng: rngFromOption(o.rng ?? "src=/dev/urandom"),
  };
  if (o.disk?.length) input.disks = o.disk.map((d) => diskFromOption(d));
  if (o.net?.length) input.net = o.net.map((n) => netFromOption(n));
  if (o.fs?.length) input.fs = o.fs.map((f) => fsFromOption(f));
  if (o.pmem?.length) input.pmem = o.pmem.map((p) => pmemFromOption(p));
  if (o.vsock !== undefined) input.vsock = vsockFromOption(o.vsock);
  if (o.device?.length) input.devices = o.device.map((d) => deviceFromOption(d));
  if (o["user-device"]?.length) input.user_devices = o["user-device"].map((d) => userDeviceFromOption(d));
  if (o.vdpa?.length) input.vdpa = o.vdpa.map((d) => vdpaFromOption(d));

  const r = VmConfigSchema.safeParse(input);
  if (!r.success) {
    const lines = r.error.issues.map((i) => {
      const opt = OPTION_OF_FIELD[String(i.path[0])] ?? "VM configuration";
      return `${opt}: ${formatZodError({ issues: [i] } as z.ZodError, opt)[0]}`;
    });
    throw new ConfigError(lines.join("\n"));
  }
  return r.data;
}
