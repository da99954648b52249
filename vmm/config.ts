/**
 * Command-line spellings of the VM configuration (Cloud Hypervisor's `key=value,key=value` option
 * strings) turned into the same {@link VmConfig} the REST API accepts, validated by the same schema.
 * Used by `dvmm` itself and by `dvmm remote add-disk path=...` and friends.
 *
 * The grammar follows Cloud Hypervisor's option parser:
 *   - the string is split at commas that are neither inside `[...]` nor inside `"..."`;
 *   - keys are matched exactly (case-sensitive, not trimmed); values are trimmed;
 *   - a key given twice keeps its last value; `key=` (empty) means "not given";
 *   - toggles are on/off/true/false in any case; sizes are a number with an optional upper-case K, M or G;
 *   - plain integers are decimal; integer lists are `[a,b,c-d]`; tuple lists are `[k@v,...]` (brackets
 *     required), where v may itself be an integer list (`affinity=[0@[0-3],1@[4]]`);
 *   - `"..."` quotes a value (a doubled `""` inside yields one `"`).
 *
 * Each option builds the object Cloud Hypervisor's parser would build (defaults filled in, CH's JSON
 * field names), which then goes through the VmConfig schema like a REST body does.
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
  type GenericVhostUserConfig,
  GenericVhostUserConfigSchema,
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
import { logger } from "./log.ts";

const log = logger("config");

/** A bad command-line value; the message names the option (and the key, when there is one). */
export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}

// ---------------------------------------------------------------------------------------------------
// Scalars

/** Remove quoting: `"a,b"` → `a,b`; a doubled quote right after a closing one yields a literal `"`. */
export function dequote(text: string): string {
  let out = "";
  let quoted = false;
  let prev = "";
  for (const ch of text) {
    if (ch === '"') {
      if (prev === '"' && !quoted) out += '"';
      quoted = !quoted;
    } else {
      out += ch;
    }
    prev = ch;
  }
  return out;
}

const SIZE_SHIFT: Record<string, number> = { K: 10, M: 20, G: 30 };

/** `512M`, `1G`, `4096`, `2K` → bytes (binary units; upper-case suffixes only, as Cloud Hypervisor). */
export function parseSize(text: string): number {
  const t = dequote(text).trim();
  const m = /^\+?(\d+)([KMG]?)$/.exec(t);
  if (!m) {
    throw new Error(`'${text}' is not a size (use a number of bytes with an optional K, M or G suffix)`);
  }
  const n = Number(m[1]) * 2 ** (SIZE_SHIFT[m[2]] ?? 0);
  if (!Number.isSafeInteger(n)) throw new Error(`size '${text}' is too large`);
  return n;
}

/** on/off/true/false in any case (Cloud Hypervisor's toggle). */
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

type IntType = "u8" | "u16" | "u32" | "u64" | "i32";
const INT_RANGE: Record<IntType, [number, number]> = {
  u8: [0, 0xff],
  u16: [0, 0xffff],
  u32: [0, 0xffff_ffff],
  u64: [0, Number.MAX_SAFE_INTEGER],
  i32: [-0x8000_0000, 0x7fff_ffff],
};

/** A decimal integer of the given width (no hex, no suffix; a leading `+` is allowed, as Rust's parser). */
export function parseInteger(text: string, type: IntType = "u64"): number {
  const t = dequote(text);
  const ok = type === "i32" ? /^[+-]?\d+$/.test(t) : /^\+?\d+$/.test(t);
  if (!ok) {
    throw new Error(`'${text}' is not ${type === "i32" ? "an integer" : "an integer (unsigned, decimal)"}`);
  }
  const n = Number(t);
  const [lo, hi] = INT_RANGE[type];
  if (!Number.isSafeInteger(n) || n < lo || n > hi) {
    throw new Error(`'${text}' is out of range (${lo}..${hi})`);
  }
  return n;
}

/** Expanded integer lists are capped so a typo like `0-4000000000` cannot exhaust memory. */
const MAX_LIST_ITEMS = 1 << 16;

/** `[1,3,5-7]` (or `4`, `0-3` without brackets) → numbers; each must fit `type`. */
export function parseIntegerList(text: string, type: IntType = "u64"): number[] {
  const inner = text.trim().replace(/^[[\]]+/, "").replace(/[[\]]+$/, "");
  const out: number[] = [];
  for (const item of inner.split(",")) {
    const bounds = item.split("-");
    if (bounds.length > 2) throw new Error(`'${item}' is not an integer or a range a-b`);
    const num = (s: string) => {
      if (!/^\+?\d+$/.test(s)) throw new Error(`'${s}' in '${text}' is not an integer`);
      return Number(s);
    };
    const start = num(bounds[0]);
    const end = bounds.length === 2 ? num(bounds[1]) : start;
    if (bounds.length === 2 && start >= end) {
      throw new Error(`range '${item}' must go from a lower to a higher number`);
    }
    if (end - start + out.length >= MAX_LIST_ITEMS) throw new Error(`list '${text}' is too long`);
    const [lo, hi] = INT_RANGE[type];
    for (let v = start; v <= end; v++) {
      if (!Number.isSafeInteger(v) || v < lo || v > hi) {
        throw new Error(`${v} is out of range (${lo}..${hi})`);
      }
      out.push(v);
    }
  }
  return out;
}

/** `[a,b]` or `a` → strings (items are taken as written). */
export function parseStringList(text: string): string[] {
  const inner = text.trim().replace(/^[[\]]+/, "").replace(/[[\]]+$/, "");
  return splitOptionString(inner);
}

/**
 * `[k1@v1,k2@v2]` → pairs (the outer brackets are required). `parseKey` and `parseValue` read each side;
 * a value may be an integer list (`0@[0-3]`).
 */
export function parseTupleList<K, V>(
  text: string,
  parseKey: (s: string) => K,
  parseValue: (s: string) => V,
): [K, V][] {
  const t = text.trim();
  if (!t.startsWith("[") || !t.endsWith("]") || t.length < 2) {
    throw new Error(`'${text}' must be a bracketed list like [a@b,c@d]`);
  }
  const out: [K, V][] = [];
  for (const raw of splitOptionString(t.slice(1, -1))) {
    const item = raw.trim();
    let at = -1;
    let quoted = false;
    for (let i = 0; i < item.length; i++) {
      if (item[i] === '"') quoted = !quoted;
      else if (item[i] === "@" && !quoted) {
        if (at !== -1) throw new Error(`'${item}' has more than one '@'`);
        at = i;
      }
    }
    if (at === -1) throw new Error(`'${item}' is not a pair like key@value`);
    if (at === 0) throw new Error(`'${item}' has an empty key`);
    out.push([parseKey(item.slice(0, at)), parseValue(item.slice(at + 1))]);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Option strings

/**
 * Split `a=1,b=[2,3],c="x,y"` at the top-level commas (the whole string is trimmed first; the parts are
 * not). Throws on unbalanced brackets or quotes.
 */
export function splitOptionString(value: string): string[] {
  const parts: string[] = [];
  let depth = 0;
  let quoted = false;
  let cur = "";
  for (const ch of value.trim()) {
    if (ch === '"') quoted = !quoted;
    else if (!quoted && ch === "[") depth++;
    else if (!quoted && ch === "]") {
      if (depth === 0) throw new Error("unbalanced quotes or brackets");
      depth--;
    } else if (!quoted && ch === "," && depth === 0) {
      parts.push(cur);
      cur = "";
      continue;
    }
    cur += ch;
  }
  if (quoted || depth !== 0) throw new Error("unbalanced quotes or brackets");
  parts.push(cur);
  return parts;
}

/** The keys given in one option string, read with the option's types; errors name the option and key. */
export class OptionValues {
  constructor(readonly option: string, readonly raw: ReadonlyMap<string, string>) {}

  /** Whether the key was written at all (also `key=` and valueless keys). */
  has(key: string): boolean {
    return this.raw.has(key);
  }

  #conv<T>(key: string, f: (v: string) => T): T | undefined {
    const v = this.raw.get(key);
    if (v === undefined || v === "") return undefined;
    try {
      return f(v);
    } catch (e) {
      throw new ConfigError(`${this.option}: ${key}: ${(e as Error).message}`);
    }
  }

  fail(message: string): never {
    throw new ConfigError(`${this.option}: ${message}`);
  }

  string(key: string): string | undefined {
    return this.#conv(key, dequote);
  }
  /** A string the option cannot do without. */
  required(key: string, hint = `${key}=...`): string {
    return this.string(key) ?? this.fail(`${key} is required (${hint})`);
  }
  toggle(key: string): boolean | undefined {
    return this.#conv(key, parseBool);
  }
  size(key: string): number | undefined {
    return this.#conv(key, parseSize);
  }
  int(key: string, type: IntType = "u64"): number | undefined {
    return this.#conv(key, (v) => parseInteger(v, type));
  }
  intList(key: string, type: IntType = "u64"): number[] | undefined {
    return this.#conv(key, (v) => parseIntegerList(v, type));
  }
  stringList(key: string): string[] | undefined {
    return this.#conv(key, parseStringList);
  }
  tupleList<K, V>(key: string, k: (s: string) => K, v: (s: string) => V): [K, V][] | undefined {
    return this.#conv(key, (s) => parseTupleList(s, k, v));
  }
  /** A word from a fixed set (matched case-insensitively unless `exact`). */
  choice<T extends string>(key: string, words: Record<string, T>, exact = false): T | undefined {
    return this.#conv(key, (v) => {
      const w = dequote(v);
      const k = exact ? w : w.toLowerCase();
      const hit = Object.hasOwn(words, k) ? words[k] : undefined;
      if (hit === undefined) throw new Error(`'${v}' is not one of ${Object.keys(words).join(", ")}`);
      return hit;
    });
  }
}

/**
 * Parse an option string against the keys it may contain. `valueless` keys are written without `=`
 * (the console mode words). Errors name the option and the key.
 */
export function parseOptions(
  option: string,
  value: string,
  keys: readonly string[],
  valueless: readonly string[] = [],
): OptionValues {
  const raw = new Map<string, string>();
  let parts: string[];
  try {
    parts = splitOptionString(value);
  } catch (e) {
    throw new ConfigError(`${option}: ${(e as Error).message} in '${value}'`);
  }
  if (value.trim() === "") return new OptionValues(option, raw);
  const known = () => [...valueless, ...keys].join(", ");
  for (const part of parts) {
    const eq = part.indexOf("=");
    const key = eq < 0 ? part : part.slice(0, eq);
    if (valueless.includes(key)) {
      raw.set(key, "");
      continue;
    }
    if (!keys.includes(key)) {
      if (key === "") {
        throw new ConfigError(`${option}: empty parameter in '${value}' (known: ${known()})`);
      }
      throw new ConfigError(`${option}: unknown parameter '${key}' (known: ${known()})`);
    }
    if (eq < 0) throw new ConfigError(`${option}: expected key=value, got '${part}'`);
    raw.set(key, part.slice(eq + 1).trim());
  }
  return new OptionValues(option, raw);
}

// ---------------------------------------------------------------------------------------------------
// Pieces shared by several options

const PCI_KEYS = ["id", "pci_segment", "pci_device_id"] as const;
const PCI_IOMMU_KEYS = ["id", "iommu", "pci_segment", "pci_device_id"] as const;

/** `id`, `pci_segment`, `pci_device_id` (and `iommu` where the option has it). */
function pciCommon(v: OptionValues, withIommu: boolean): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  const id = v.string("id");
  if (id !== undefined) out.id = id;
  if (withIommu) out.iommu = v.toggle("iommu") ?? false;
  out.pci_segment = v.int("pci_segment", "u16") ?? 0;
  const dev = v.int("pci_device_id", "u8");
  if (dev !== undefined) out.pci_device_id = dev;
  return out;
}

const RATE_LIMIT_KEYS = [
  "bw_size",
  "bw_one_time_burst",
  "bw_refill_time",
  "ops_size",
  "ops_one_time_burst",
  "ops_refill_time",
] as const;

/** A token bucket exists only when both its size and its refill time are non-zero (as CH). */
function tokenBucket(v: OptionValues, prefix: "bw" | "ops"): Record<string, number> | undefined {
  const size = v.int(`${prefix}_size`) ?? 0;
  const burst = v.int(`${prefix}_one_time_burst`) ?? 0;
  const refill = v.int(`${prefix}_refill_time`) ?? 0;
  return size !== 0 && refill !== 0 ? { size, one_time_burst: burst, refill_time: refill } : undefined;
}

function rateLimiter(v: OptionValues): Record<string, unknown> | undefined {
  const bandwidth = tokenBucket(v, "bw");
  const ops = tokenBucket(v, "ops");
  if (!bandwidth && !ops) return undefined;
  const out: Record<string, unknown> = {};
  if (bandwidth) out.bandwidth = bandwidth;
  if (ops) out.ops = ops;
  return out;
}

/** Set `out[k]` only when `value` is defined (CH leaves absent options out of its JSON). */
function put(out: Record<string, unknown>, k: string, value: unknown): void {
  if (value !== undefined) out[k] = value;
}

const u32Key = (s: string) => parseInteger(s, "u32");
const u16Key = (s: string) => parseInteger(s, "u16");

// ---------------------------------------------------------------------------------------------------
// Per-option parsers (returning schema input, not yet validated as part of a VM)

export function cpusFromOption(value: string): Record<string, unknown> {
  const v = parseOptions("--cpus", value, [
    "boot",
    "max",
    "topology",
    "kvm_hyperv",
    "max_phys_bits",
    "affinity",
    "features",
    "nested",
    "core_scheduling",
    "profile",
  ]);
  const boot = v.int("boot", "u32") ?? 1;
  const out: Record<string, unknown> = { boot_vcpus: boot, max_vcpus: v.int("max", "u32") ?? boot };
  const topology = v.string("topology");
  if (topology !== undefined) {
    const t = topology.split(":");
    let parts: number[] = [];
    try {
      if (t.length !== 4) throw new Error();
      parts = t.map((p) => parseInteger(p, "u16"));
    } catch {
      v.fail(
        `topology: '${topology}' is not threads_per_core:cores_per_die:dies_per_package:packages ` +
          `(four numbers, e.g. 1:2:1:1)`,
      );
    }
    const [threads_per_core, cores_per_die, dies_per_package, packages] = parts;
    out.topology = { threads_per_core, cores_per_die, dies_per_package, packages };
  }
  out.kvm_hyperv = v.toggle("kvm_hyperv") ?? false;
  out.max_phys_bits = v.int("max_phys_bits", "u8") ?? 46;
  const affinity = v.tupleList("affinity", u32Key, (s) => parseIntegerList(s));
  if (affinity) out.affinity = affinity.map(([vcpu, host_cpus]) => ({ vcpu, host_cpus }));
  const features = { amx: false };
  for (const f of v.stringList("features") ?? []) {
    if (f === "amx") features.amx = true;
    else v.fail(`features: unknown CPU feature '${f}' (known: amx)`);
  }
  out.features = features;
  out.nested = v.toggle("nested") ?? true;
  out.core_scheduling = v.choice("core_scheduling", { vm: "Vm", vcpu: "Vcpu", off: "Off" }) ?? "Vm";
  out.profile = v.choice("profile", { Host: "Host" }, true) ?? "Host";
  return out;
}

const MEMORY_ZONE_KEYS = [
  "id",
  "size",
  "file",
  "shared",
  "hugepages",
  "hugepage_size",
  "host_numa_node",
  "hotplug_size",
  "hotplugged_size",
  "prefault",
  "reserve",
  "mergeable",
] as const;

export function memoryZoneFromOption(value: string, mergeableDefault = false): Record<string, unknown> {
  const v = parseOptions("--memory-zone", value, MEMORY_ZONE_KEYS);
  const out: Record<string, unknown> = { id: v.required("id", "id=NAME") };
  out.size = v.size("size") ?? 512 << 20;
  put(out, "file", v.string("file"));
  out.shared = v.toggle("shared") ?? false;
  out.hugepages = v.toggle("hugepages") ?? false;
  put(out, "hugepage_size", v.size("hugepage_size"));
  put(out, "host_numa_node", v.int("host_numa_node", "u32"));
  put(out, "hotplug_size", v.size("hotplug_size"));
  put(out, "hotplugged_size", v.size("hotplugged_size"));
  out.prefault = v.toggle("prefault") ?? false;
  out.reserve = v.toggle("reserve") ?? false;
  out.mergeable = v.toggle("mergeable") ?? mergeableDefault;
  return out;
}

/** `--memory` (and the `--memory-zone` list, whose `mergeable` defaults to the memory's). */
export function memoryFromOption(value: string, zones?: string[]): Record<string, unknown> {
  const v = parseOptions("--memory", value, [
    "size",
    "file",
    "mergeable",
    "hotplug_method",
    "hotplug_size",
    "hotplugged_size",
    "shared",
    "hugepages",
    "hugepage_size",
    "prefault",
    "reserve",
    "thp",
  ]);
  if (v.string("file") !== undefined) {
    log.warn(
      "--memory: 'file' is accepted and ignored (as Cloud Hypervisor does); use --memory-zone file=PATH",
    );
  }
  const out: Record<string, unknown> = { size: v.size("size") ?? 512 << 20 };
  const mergeable = v.toggle("mergeable") ?? false;
  out.mergeable = mergeable;
  out.hotplug_method = v.choice("hotplug_method", { "acpi": "Acpi", "virtio-mem": "VirtioMem" }) ?? "Acpi";
  put(out, "hotplug_size", v.size("hotplug_size"));
  put(out, "hotplugged_size", v.size("hotplugged_size"));
  out.shared = v.toggle("shared") ?? false;
  out.hugepages = v.toggle("hugepages") ?? false;
  put(out, "hugepage_size", v.size("hugepage_size"));
  out.prefault = v.toggle("prefault") ?? false;
  out.reserve = v.toggle("reserve") ?? false;
  if (zones) out.zones = zones.map((z) => memoryZoneFromOption(z, mergeable));
  out.thp = v.toggle("thp") ?? true;
  return out;
}

export function rateLimitGroupFromOption(value: string): Record<string, unknown> {
  const v = parseOptions("--rate-limit-group", value, [...RATE_LIMIT_KEYS, "id"]);
  const config: Record<string, unknown> = {};
  put(config, "bandwidth", tokenBucket(v, "bw"));
  put(config, "ops", tokenBucket(v, "ops"));
  return { id: v.string("id") ?? "", rate_limiter_config: config };
}

const IMAGE_TYPES = { vmdk: "FlatVmdk", vhd: "FixedVhd", qcow2: "Qcow2", raw: "Raw", vhdx: "Vhdx" } as const;

export function diskFromOption(value: string, option = "--disk"): Record<string, unknown> {
  const v = parseOptions(option, value, [
    "path",
    "readonly",
    "direct",
    "queue_size",
    "num_queues",
    "vhost_user",
    "socket",
    ...RATE_LIMIT_KEYS,
    "_disable_io_uring",
    "_disable_aio",
    "serial",
    "rate_limit_group",
    "queue_affinity",
    "backing_files",
    "sparse",
    "image_type",
    "lock_granularity",
    ...PCI_IOMMU_KEYS,
  ]);
  const out = pciCommon(v, true);
  put(out, "path", v.string("path"));
  out.readonly = v.toggle("readonly") ?? false;
  out.direct = v.toggle("direct") ?? false;
  out.num_queues = v.int("num_queues") ?? 1;
  out.queue_size = v.int("queue_size", "u16") ?? 128;
  out.vhost_user = v.toggle("vhost_user") ?? false;
  const socket = v.string("socket");
  put(out, "vhost_socket", socket);
  put(out, "rate_limit_group", v.string("rate_limit_group"));
  put(out, "rate_limiter_config", rateLimiter(v));
  out.disable_io_uring = v.toggle("_disable_io_uring") ?? false;
  out.disable_aio = v.toggle("_disable_aio") ?? false;
  put(out, "serial", v.string("serial"));
  const affinity = v.tupleList("queue_affinity", u16Key, (s) => parseIntegerList(s));
  if (affinity) out.queue_affinity = affinity.map(([queue_index, host_cpus]) => ({ queue_index, host_cpus }));
  out.backing_files = v.toggle("backing_files") ?? false;
  out.sparse = v.toggle("sparse") ?? true;
  // As Cloud Hypervisor: the image type of a vhost-user disk is the backend's business.
  out.image_type = socket === undefined ? (v.choice("image_type", IMAGE_TYPES) ?? "Unknown") : "Unknown";
  out.lock_granularity = v.choice("lock_granularity", { "byte-range": "ByteRange", "full": "Full" }, true) ??
    "ByteRange";
  return out;
}

const MAC_RE = /^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/;

function parseMac(text: string): string {
  if (!MAC_RE.test(text)) throw new Error(`'${text}' is not a MAC address (like 12:34:56:78:90:ab)`);
  return text.toLowerCase();
}

function parseIp(text: string): string {
  const v4 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(text);
  if (v4) {
    if (v4.slice(1).every((o) => Number(o) <= 255 && (o === "0" || !o.startsWith("0")))) return text;
  } else if (text.includes(":") && /^[0-9a-fA-F:.]+$/.test(text)) {
    try {
      const host = new URL(`http://[${text}]/`).hostname;
      // Written the canonical way (RFC 5952), as Cloud Hypervisor prints an IpAddr.
      return text.includes(".") ? text.toLowerCase() : host.slice(1, -1);
    } catch { /* not an address */ }
  }
  throw new Error(`'${text}' is not an IPv4 or IPv6 address`);
}

export function netFromOption(value: string, option = "--net"): Record<string, unknown> {
  const v = parseOptions(option, value, [
    "tap",
    "ip",
    "mask",
    "mac",
    "host_mac",
    "offload_tso",
    "offload_ufo",
    "offload_csum",
    "mtu",
    "queue_size",
    "num_queues",
    "vhost_user",
    "socket",
    "vhost_mode",
    "fd",
    ...RATE_LIMIT_KEYS,
    ...PCI_IOMMU_KEYS,
  ]);
  const out = pciCommon(v, true);
  put(out, "tap", v.string("tap"));
  const conv = <T>(key: string, f: (s: string) => T) => {
    const s = v.string(key);
    if (s === undefined) return undefined;
    try {
      return f(s);
    } catch (e) {
      return v.fail(`${key}: ${(e as Error).message}`);
    }
  };
  put(out, "ip", conv("ip", parseIp));
  put(out, "mask", conv("mask", parseIp));
  put(out, "mac", conv("mac", parseMac));
  put(out, "host_mac", conv("host_mac", parseMac));
  put(out, "mtu", v.int("mtu", "u16"));
  out.num_queues = v.int("num_queues") ?? 2;
  out.queue_size = v.int("queue_size", "u16") ?? 256;
  out.vhost_user = v.toggle("vhost_user") ?? false;
  put(out, "vhost_socket", v.string("socket"));
  out.vhost_mode = v.choice("vhost_mode", { client: "Client", server: "Server" }) ?? "Client";
  put(out, "fds", v.intList("fd", "i32"));
  put(out, "rate_limiter_config", rateLimiter(v));
  out.offload_tso = v.toggle("offload_tso") ?? true;
  out.offload_ufo = v.toggle("offload_ufo") ?? true;
  out.offload_csum = v.toggle("offload_csum") ?? true;
  return out;
}

export function rngFromOption(value: string): Record<string, unknown> {
  const v = parseOptions("--rng", value, ["src", ...PCI_IOMMU_KEYS]);
  return { ...pciCommon(v, true), src: v.string("src") ?? "/dev/urandom" };
}

/** `--rtc` (a bare `--rtc` is the empty string: the device with its defaults). */
export function rtcFromOption(value: string): Record<string, unknown> {
  return pciCommon(parseOptions("--rtc", value, PCI_IOMMU_KEYS), true);
}

export function balloonFromOption(value: string): Record<string, unknown> {
  const v = parseOptions("--balloon", value, [
    "size",
    "deflate_on_oom",
    "free_page_reporting",
    ...PCI_IOMMU_KEYS,
  ]);
  return {
    ...pciCommon(v, true),
    size: v.size("size") ?? 0,
    deflate_on_oom: v.toggle("deflate_on_oom") ?? false,
    free_page_reporting: v.toggle("free_page_reporting") ?? false,
  };
}

/** virtio-fs tags are at most 36 bytes. */
const FS_TAG_MAX = 36;

export function fsFromOption(value: string, option = "--fs"): Record<string, unknown> {
  const v = parseOptions(option, value, ["tag", "queue_size", "num_queues", "socket", ...PCI_KEYS]);
  const tag = v.required("tag", "tag=NAME");
  if (new TextEncoder().encode(tag).length > FS_TAG_MAX) {
    v.fail(`tag: '${tag}' is longer than ${FS_TAG_MAX} bytes`);
  }
  return {
    ...pciCommon(v, false),
    tag,
    socket: v.required("socket", "socket=PATH"),
    num_queues: v.int("num_queues") ?? 1,
    queue_size: v.int("queue_size", "u16") ?? 1024,
  };
}

export function pmemFromOption(value: string, option = "--pmem"): Record<string, unknown> {
  const v = parseOptions(option, value, ["size", "file", "discard_writes", ...PCI_IOMMU_KEYS]);
  const out = pciCommon(v, true);
  out.file = v.required("file", "file=PATH");
  put(out, "size", v.size("size"));
  out.discard_writes = v.toggle("discard_writes") ?? false;
  return out;
}

/** Virtio device type names accepted by `--generic-vhost-user device_type=` (→ virtio device ids). */
export const VIRTIO_DEVICE_TYPES: Readonly<Record<string, number>> = {
  net: 1,
  block: 2,
  console: 3,
  rng: 4,
  balloon: 5,
  iomem: 6,
  rpmsg: 7,
  scsi: 8,
  "9p": 9,
  mac80211_wlan: 10,
  rproc_serial: 11,
  caif: 12,
  memory_balloon: 13,
  gpu: 16,
  clock: 17,
  input: 18,
  vsock: 19,
  crypto: 20,
  signal_dist: 21,
  pstore: 22,
  iommu: 23,
  mem: 24,
  sound: 25,
  fs: 26,
  pmem: 27,
  rpmb: 28,
  mac80211_hwsim: 29,
  video_encoder: 30,
  video_decoder: 31,
  scmi: 32,
  nitro_sec_mod: 33,
  i2c: 34,
  watchdog: 35,
  can: 36,
  dmabuf: 37,
  param_serv: 38,
  audio_policy: 39,
  bt: 40,
  gpio: 41,
  rdma: 42,
  camera: 43,
  ism: 44,
  spi: 45,
  tee: 46,
  cpu_balloon: 47,
  media: 48,
  usb: 49,
};

/** Device types a vhost-user backend cannot provide (an IOMMU, a watchdog that resets the guest). */
const NOT_VHOST_USER = new Set([23, 35]);

export function genericVhostUserFromOption(
  value: string,
  option = "--generic-vhost-user",
): Record<string, unknown> {
  const v = parseOptions(option, value, ["device_type", "virtio_id", "queue_sizes", "socket", ...PCI_KEYS]);
  const socket = v.required("socket", "socket=PATH");
  const queue_sizes = v.intList("queue_sizes", "u16") ??
    v.fail("queue_sizes is required (queue_sizes=[N,...])");
  const legacy = v.string("virtio_id");
  if (legacy !== undefined) log.warn(`${option}: 'virtio_id' is deprecated; use 'device_type'`);
  const name = v.string("device_type") ?? legacy ??
    v.fail("device_type is required (device_type=NAME or a virtio device id)");
  let device_type = Object.hasOwn(VIRTIO_DEVICE_TYPES, name) ? VIRTIO_DEVICE_TYPES[name] : undefined;
  if (device_type === undefined) {
    const n = /^[1-9]\d*$/.test(name) ? Number(name) : NaN;
    if (!Number.isSafeInteger(n) || n > 0xffff_ffff) {
      v.fail(
        `device_type: '${name}' is not a virtio device type (a name such as net, block, fs, gpu, sound, ` +
          `or a virtio device id)`,
      );
    }
    device_type = n;
  }
  if (NOT_VHOST_USER.has(device_type)) {
    v.fail(`device_type: '${name}' devices cannot be implemented with vhost-user`);
  }
  return { ...pciCommon(v, false), socket, queue_sizes, device_type };
}

const CONSOLE_MODE_WORDS = ["off", "pty", "tty", "null"] as const;
const CONSOLE_MODES: [string, string][] = [
  ["off", "Off"],
  ["pty", "Pty"],
  ["tty", "Tty"],
  ["null", "Null"],
];

function consoleMode(v: OptionValues, socketAllowed: boolean): Record<string, unknown> {
  // With several mode words the first of off, pty, tty, null, file, socket wins (as Cloud Hypervisor).
  for (const [word, mode] of CONSOLE_MODES) if (v.has(word)) return { mode };
  if (v.has("file")) {
    return { mode: "File", file: v.string("file") ?? v.fail("file: path missing (file=PATH)") };
  }
  if (socketAllowed && v.has("socket")) {
    return { mode: "Socket", socket: v.string("socket") ?? v.fail("socket: path missing (socket=PATH)") };
  }
  return v.fail(
    `no output mode given (use off, pty, tty, null, file=PATH${socketAllowed ? " or socket=PATH" : ""})`,
  );
}

/** `--serial`/`--console`: off | null | pty | tty | file=PATH | socket=PATH (+ id/iommu/pci_* for console). */
export function consoleFromOption(option: "--serial" | "--console", value: string): Record<string, unknown> {
  if (option === "--serial") {
    return consoleMode(parseOptions(option, value, ["file", "socket"], CONSOLE_MODE_WORDS), true);
  }
  const v = parseOptions(option, value, ["file", "socket", ...PCI_IOMMU_KEYS], CONSOLE_MODE_WORDS);
  return { ...consoleMode(v, true), ...pciCommon(v, true) };
}

/** `--debug-console`: off | pty | tty | null | file=PATH, and iobase=0xNN (the port, in hex). */
export function debugConsoleFromOption(value: string): Record<string, unknown> {
  const v = parseOptions("--debug-console", value, ["file", "iobase"], CONSOLE_MODE_WORDS);
  const out = consoleMode(v, false);
  const iobase = v.string("iobase");
  if (iobase !== undefined) {
    const m = /^0x([0-9a-fA-F]{1,4})$/.exec(iobase);
    if (!m) return v.fail(`iobase: '${iobase}' is not an I/O port in hex (like 0xe9)`);
    out.iobase = parseInt(m[1], 16);
  }
  return out;
}

export function deviceFromOption(value: string, option = "--device"): Record<string, unknown> {
  const v = parseOptions(option, value, [
    "path",
    "fd",
    ...PCI_IOMMU_KEYS,
    "x_nv_gpudirect_clique",
    "x_exclude_mmap_bars",
  ]);
  const out = pciCommon(v, true);
  put(out, "path", v.string("path"));
  put(out, "fd", v.int("fd", "i32"));
  put(out, "x_nv_gpudirect_clique", v.int("x_nv_gpudirect_clique", "u8"));
  out.x_exclude_mmap_bars = v.intList("x_exclude_mmap_bars") ?? [];
  return out;
}

export function userDeviceFromOption(value: string, option = "--user-device"): Record<string, unknown> {
  const v = parseOptions(option, value, ["socket", ...PCI_KEYS]);
  return { ...pciCommon(v, false), socket: v.required("socket", "socket=PATH") };
}

export function vdpaFromOption(value: string, option = "--vdpa"): Record<string, unknown> {
  const v = parseOptions(option, value, ["path", "num_queues", ...PCI_IOMMU_KEYS]);
  return {
    ...pciCommon(v, true),
    path: v.required("path", "path=DEVICE"),
    num_queues: v.int("num_queues") ?? 1,
  };
}

export function vsockFromOption(value: string, option = "--vsock"): Record<string, unknown> {
  const v = parseOptions(option, value, ["socket", "cid", ...PCI_IOMMU_KEYS]);
  const out = pciCommon(v, true);
  out.socket = v.required("socket", "socket=PATH");
  out.cid = v.int("cid", "u32") ?? v.fail("cid is required (cid=N)");
  return out;
}

export function numaFromOption(value: string): Record<string, unknown> {
  const v = parseOptions("--numa", value, [
    "guest_numa_id",
    "cpus",
    "distances",
    "device_id",
    "memory_zones",
    "pci_segments",
  ]);
  const out: Record<string, unknown> = {
    guest_numa_id: v.int("guest_numa_id", "u32") ?? v.fail("guest_numa_id is required for every NUMA node"),
  };
  put(out, "cpus", v.intList("cpus", "u32"));
  const distances = v.tupleList("distances", u32Key, (s) => parseInteger(s, "u8"));
  if (distances) out.distances = distances.map(([destination, distance]) => ({ destination, distance }));
  put(out, "memory_zones", v.stringList("memory_zones"));
  put(out, "pci_segments", v.intList("pci_segments", "u16"));
  const device_id = v.string("device_id");
  if (device_id !== undefined) {
    if (out.cpus !== undefined || out.memory_zones !== undefined) {
      v.fail("device_id cannot be combined with cpus or memory_zones");
    }
    out.device_id = device_id;
  }
  return out;
}

const SMBIOS_KEYS = [
  "system_manufacturer",
  "system_product_name",
  "system_version",
  "system_serial_number",
  "system_uuid",
  "system_sku_number",
  "system_family",
  "chassis_asset_tag",
] as const;

export function platformFromOption(value: string): Record<string, unknown> {
  const v = parseOptions("--platform", value, [
    "num_pci_segments",
    "iommu_segments",
    "iommu_address_width",
    "serial_number",
    "uuid",
    "oem_strings",
    "iommufd",
    "iommufd_fd",
    "vfio_p2p_dma",
    ...SMBIOS_KEYS,
  ]);
  const out: Record<string, unknown> = { num_pci_segments: v.int("num_pci_segments", "u16") ?? 1 };
  put(out, "iommu_segments", v.intList("iommu_segments", "u16"));
  out.iommu_address_width_bits = v.int("iommu_address_width", "u8") ?? 64;
  for (const k of SMBIOS_KEYS) put(out, k, v.string(k));
  for (const [old, now] of [["serial_number", "system_serial_number"], ["uuid", "system_uuid"]] as const) {
    const legacy = v.string(old);
    if (legacy === undefined) continue;
    log.warn(`--platform: '${old}' is deprecated; use '${now}'`);
    if (out[now] === undefined) out[now] = legacy;
  }
  put(out, "oem_strings", v.stringList("oem_strings"));
  const iommufd_fd = v.int("iommufd_fd", "i32");
  // iommufd_fd=N implies iommufd=on unless iommufd is given.
  out.iommufd = v.toggle("iommufd") ?? iommufd_fd !== undefined;
  put(out, "iommufd_fd", iommufd_fd);
  out.vfio_p2p_dma = v.toggle("vfio_p2p_dma") ?? true;
  return out;
}

export function pciSegmentFromOption(value: string): Record<string, unknown> {
  const v = parseOptions("--pci-segment", value, [
    "mmio32_aperture_weight",
    "mmio64_aperture_weight",
    "pci_segment",
  ]);
  return {
    pci_segment: v.int("pci_segment", "u16") ?? 0,
    mmio32_aperture_weight: v.int("mmio32_aperture_weight", "u32") ?? 1,
    mmio64_aperture_weight: v.int("mmio64_aperture_weight", "u32") ?? 1,
  };
}

export function tpmFromOption(value: string): Record<string, unknown> {
  return { socket: parseOptions("--tpm", value, ["socket"]).required("socket", "socket=PATH of swtpm") };
}

export function landlockRuleFromOption(value: string): Record<string, unknown> {
  const v = parseOptions("--landlock-rules", value, ["path", "access"]);
  const path = v.required("path", "path=PATH");
  const access = v.required("access", "access=r, w or rw");
  if ([...access].length > 2) v.fail(`access: '${access}' is not r, w or rw`);
  return { path, access };
}

// Validated single-device parsers (for `dvmm remote add-*`).

function validate<S extends z.ZodTypeAny>(option: string, schema: S, value: unknown): z.infer<S> {
  const r = schema.safeParse(value);
  if (!r.success) throw new ConfigError(`${option}: ${formatZodError(r.error, option).join("; ")}`);
  return r.data;
}

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
export const parseGenericVhostUserConfig = (
  v: string,
  o = "add-generic-vhost-user",
): GenericVhostUserConfig => validate(o, GenericVhostUserConfigSchema, genericVhostUserFromOption(v, o));

/** `--restore` / `remote restore`: the RestoreConfig Cloud Hypervisor's parser builds (unvalidated). */
export function restoreFromOption(value: string, option = "--restore"): Record<string, unknown> {
  const v = parseOptions(option, value, [
    "source_url",
    "prefault",
    "memory_restore_mode",
    "net_fds",
    "vfio_fds",
    "iommufd_fd",
    "resume",
    "zone_updates",
  ]);
  const out: Record<string, unknown> = {
    source_url: v.required("source_url", "source_url=file:///DIR"),
    prefault: v.toggle("prefault") ?? false,
    memory_restore_mode: v.choice("memory_restore_mode", { copy: "Copy", ondemand: "OnDemand" }) ?? "Copy",
  };
  const netFds = v.tupleList("net_fds", dequote, (s) => parseIntegerList(s, "i32"));
  if (netFds) out.net_fds = netFds.map(([id, fds]) => ({ id, num_fds: fds.length, fds }));
  const vfioFds = v.tupleList("vfio_fds", dequote, (s) => parseInteger(s, "i32"));
  if (vfioFds) out.vfio_fds = vfioFds.map(([id, fd]) => ({ id, fd }));
  put(out, "iommufd_fd", v.int("iommufd_fd", "i32"));
  out.resume = v.toggle("resume") ?? false;
  const zones = v.tupleList("zone_updates", dequote, (s) => parseInteger(s, "u32"));
  out.zone_updates = (zones ?? []).map(([id, host_numa_node]) => ({ id, host_numa_node }));
  return out;
}

export function parseRestoreConfig(value: string, option = "restore"): RestoreConfig {
  return validate(option, RestoreConfigSchema, restoreFromOption(value, option));
}

// ---------------------------------------------------------------------------------------------------
// The whole VM

/**
 * VM options as given on the command line: single-value options as strings, repeatable ones as the list
 * of every value of every occurrence, flags as booleans. `rtc` is "" for a bare `--rtc`.
 */
export interface CliVmOptions {
  kernel?: string;
  firmware?: string;
  initramfs?: string;
  cmdline?: string;
  cpus?: string;
  memory?: string;
  "memory-zone"?: string[];
  serial?: string;
  console?: string;
  "debug-console"?: string;
  rng?: string;
  rtc?: string;
  balloon?: string;
  vsock?: string;
  platform?: string;
  tpm?: string;
  disk?: string[];
  net?: string[];
  fs?: string[];
  pmem?: string[];
  device?: string[];
  "user-device"?: string[];
  vdpa?: string[];
  "generic-vhost-user"?: string[];
  numa?: string[];
  "pci-segment"?: string[];
  "rate-limit-group"?: string[];
  "landlock-rules"?: string[];
  pvpanic?: boolean;
  watchdog?: boolean;
  landlock?: boolean;
}

/** The command-line defaults of the single-value VM options (Cloud Hypervisor's). */
export const CLI_DEFAULTS = {
  cpus: "boot=1,max_phys_bits=46",
  memory: "size=512M",
  serial: "null",
  console: "tty",
  "debug-console": "off,iobase=0xe9",
  rng: "src=/dev/urandom",
} as const;

/** Whether any option describing a VM was given (otherwise dvmm only serves the API). */
export function hasVmOptions(o: CliVmOptions): boolean {
  return o.kernel !== undefined || o.firmware !== undefined;
}

/**
 * The VmConfig input the command line describes, as Cloud Hypervisor's parser builds it (every default
 * filled in, CH's field names), before schema validation.
 */
export function vmConfigInputFromCli(o: CliVmOptions): Record<string, unknown> {
  if (o.kernel === undefined && o.firmware === undefined) {
    throw new ConfigError("--kernel (or --firmware) is required to describe a VM");
  }
  const payload: Record<string, unknown> = {};
  put(payload, "firmware", o.firmware);
  put(payload, "kernel", o.kernel);
  put(payload, "cmdline", o.cmdline);
  put(payload, "initramfs", o.initramfs);
  if (o.firmware !== undefined && o.kernel === undefined) {
    // As Cloud Hypervisor: firmware boots on its own; a command line and an initramfs are dropped.
    for (const k of ["cmdline", "initramfs"] as const) {
      if (payload[k] !== undefined) {
        log.warn(`--${k} is ignored when booting --firmware (as Cloud Hypervisor does)`);
        delete payload[k];
      }
    }
  }
  const list = <T>(values: string[] | undefined, f: (s: string) => T) => values?.map(f);

  const input: Record<string, unknown> = {
    cpus: cpusFromOption(o.cpus ?? CLI_DEFAULTS.cpus),
    memory: memoryFromOption(o.memory ?? CLI_DEFAULTS.memory, o["memory-zone"]),
    payload,
  };
  put(input, "rate_limit_groups", list(o["rate-limit-group"], rateLimitGroupFromOption));
  put(input, "disks", list(o.disk, (d) => diskFromOption(d)));
  put(input, "net", list(o.net, (n) => netFromOption(n)));
  input.rng = rngFromOption(o.rng ?? CLI_DEFAULTS.rng);
  if (o.balloon !== undefined) input.balloon = balloonFromOption(o.balloon);
  put(input, "generic_vhost_user", list(o["generic-vhost-user"], (g) => genericVhostUserFromOption(g)));
  put(input, "fs", list(o.fs, (f) => fsFromOption(f)));
  put(input, "pmem", list(o.pmem, (p) => pmemFromOption(p)));
  input.serial = consoleFromOption("--serial", o.serial ?? CLI_DEFAULTS.serial);
  input.console = consoleFromOption("--console", o.console ?? CLI_DEFAULTS.console);
  input.debug_console = debugConsoleFromOption(o["debug-console"] ?? CLI_DEFAULTS["debug-console"]);
  put(input, "devices", list(o.device, (d) => deviceFromOption(d)));
  put(input, "user_devices", list(o["user-device"], (d) => userDeviceFromOption(d)));
  put(input, "vdpa", list(o.vdpa, (d) => vdpaFromOption(d)));
  if (o.vsock !== undefined) input.vsock = vsockFromOption(o.vsock);
  input.pvpanic = o.pvpanic ?? false;
  put(input, "numa", list(o.numa, numaFromOption));
  input.watchdog = o.watchdog ?? false;
  if (o.rtc !== undefined) input.rtc = rtcFromOption(o.rtc);
  put(input, "pci_segments", list(o["pci-segment"], pciSegmentFromOption));
  if (o.platform !== undefined) input.platform = platformFromOption(o.platform);
  if (o.tpm !== undefined) input.tpm = tpmFromOption(o.tpm);
  input.landlock_enable = o.landlock ?? false;
  put(input, "landlock_rules", list(o["landlock-rules"], landlockRuleFromOption));
  input.iommu = vmNeedsIommu(input);
  return input;
}

/** As Cloud Hypervisor's validation: the VM has an IOMMU when any device asks for one (or iommu_segments). */
function vmNeedsIommu(c: Record<string, unknown>): boolean {
  const one = (d: unknown) => (d as { iommu?: boolean } | undefined)?.iommu === true;
  const many = (l: unknown) => Array.isArray(l) && l.some(one);
  return many(c.disks) || many(c.net) || many(c.pmem) || one(c.rng) || one(c.rtc) || one(c.console) ||
    many(c.vdpa) || one(c.balloon) || many(c.devices) || one(c.vsock) ||
    (c.platform as { iommu_segments?: unknown } | undefined)?.iommu_segments !== undefined;
}

/** Which option a VmConfig field comes from (for naming it in schema errors). */
const OPTION_OF_FIELD: Record<string, string> = {
  cpus: "--cpus",
  memory: "--memory",
  "memory.zones": "--memory-zone",
  payload: "--kernel",
  "payload.firmware": "--firmware",
  "payload.cmdline": "--cmdline",
  "payload.initramfs": "--initramfs",
  rate_limit_groups: "--rate-limit-group",
  disks: "--disk",
  net: "--net",
  rng: "--rng",
  balloon: "--balloon",
  generic_vhost_user: "--generic-vhost-user",
  fs: "--fs",
  pmem: "--pmem",
  serial: "--serial",
  console: "--console",
  debug_console: "--debug-console",
  devices: "--device",
  user_devices: "--user-device",
  vdpa: "--vdpa",
  vsock: "--vsock",
  pvpanic: "--pvpanic",
  numa: "--numa",
  watchdog: "--watchdog",
  rtc: "--rtc",
  pci_segments: "--pci-segment",
  platform: "--platform",
  tpm: "--tpm",
  landlock_enable: "--landlock",
  landlock_rules: "--landlock-rules",
};

function optionOf(path: readonly PropertyKey[]): string {
  const two = `${String(path[0])}.${String(path[1])}`;
  return OPTION_OF_FIELD[two] ?? OPTION_OF_FIELD[String(path[0])] ?? "VM configuration";
}

/** Build and validate the VM configuration described by the command line. */
export function vmConfigFromCli(o: CliVmOptions): VmConfig {
  const input = vmConfigInputFromCli(o);
  const r = VmConfigSchema.safeParse(input);
  if (!r.success) {
    const lines = r.error.issues.map((i) => {
      const opt = optionOf(i.path);
      return `${opt}: ${formatZodError({ issues: [i] } as z.ZodError, opt)[0]}`;
    });
    throw new ConfigError(lines.join("\n"));
  }
  return r.data;
}
