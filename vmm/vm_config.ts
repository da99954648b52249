/**
 * The VM configuration model and the bodies of the VM actions, shaped after Cloud Hypervisor's
 * (field names, types, defaults, as its `vm_config.rs` serializes them and its OpenAPI document states
 * them). Read the way Cloud Hypervisor reads them ({@link readConfig}): unknown fields are ignored
 * (and reported to the caller), `null` means absent. Wrong types and broken rules are errors naming the
 * field. Cross-field rules (vCPU counts, console modes, unique identifiers, ...) are checked on the
 * whole VmConfig.
 *
 * The inferred output types (defaults applied) are what the rest of dvmm works with; the API and the
 * CLI validate and translate into them.
 */
import { z } from "zod";
import { deviceIds } from "./device_ids.ts";
export { deviceIds };

// ---------------------------------------------------------------------------------------------------
// Scalar helpers

const int = () => z.number().int();
const u8 = () => int().min(0).max(255);
const u16 = () => int().min(0).max(65535);
const u32 = () => int().min(0).max(0xffff_ffff);
/** A non-negative 64-bit quantity (bytes, ids); JSON numbers are exact up to 2^53. */
const u64 = () => int().min(0).max(Number.MAX_SAFE_INTEGER);
const pciSegment = () => u16();
/** Device number on a PCI bus: 5 bits. */
const pciDeviceId = () => int().min(0).max(31);
const nonEmpty = (what: string) => z.string().min(1, `${what} must not be empty`);
/** A user-given device identifier (`__` names are Cloud Hypervisor's own, as `__rng`). */
const deviceId = () =>
  nonEmpty("id").refine((s) => !s.startsWith("__"), "identifiers starting with __ are reserved");

/**
 * What every PCI device config carries (Cloud Hypervisor's PciDeviceCommonConfig): `pci_segment` is
 * always reported, `iommu` only when on (see {@link vmInfoConfig}), `id` once given or assigned.
 */
const pciCommon = () => ({
  id: deviceId().optional(),
  iommu: z.boolean().default(false),
  pci_segment: pciSegment().default(0),
  pci_device_id: pciDeviceId().optional(),
});

function isPowerOfTwo(n: number): boolean {
  // Arithmetic, not `n & (n - 1)`: bit operators cut to 32 bits (6 GiB would pass).
  return Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}
const queueSize = (dflt: number) =>
  int().min(1).max(32768).refine(isPowerOfTwo, "must be a power of two").default(dflt);

// ---------------------------------------------------------------------------------------------------
// VmConfig parts

export const CpuAffinitySchema = z.object({ vcpu: u32(), host_cpus: z.array(u32()) });
export const CpuFeaturesSchema = z.object({ amx: z.boolean().default(false) });
/** Each member at least 1: a 0 makes the product 0, which no max_vcpus matches (Cloud Hypervisor refuses it). */
export const CpuTopologySchema = z.object({
  threads_per_core: u8().min(1),
  cores_per_die: u8().min(1),
  dies_per_package: u8().min(1),
  packages: u8().min(1),
});

export const CpusConfigSchema = z.object({
  boot_vcpus: int().min(1).max(255),
  max_vcpus: int().min(1).max(255),
  topology: CpuTopologySchema.optional(),
  kvm_hyperv: z.boolean().default(false),
  max_phys_bits: int().min(1).max(64).default(46),
  nested: z.boolean().default(true),
  affinity: z.array(CpuAffinitySchema).optional(),
  features: CpuFeaturesSchema.default({}),
  core_scheduling: z.enum(["Vm", "Vcpu", "Off"]).default("Vm"),
  /** Cloud Hypervisor's CPU profile (not in its document; `Host` is its one value). */
  profile: z.enum(["Host"]).default("Host"),
}).superRefine((c, ctx) => {
  if (c.boot_vcpus > c.max_vcpus) {
    ctx.addIssue({
      code: z.ZodIssueCode.custom,
      path: ["boot_vcpus"],
      message: `boot_vcpus (${c.boot_vcpus}) must not exceed max_vcpus (${c.max_vcpus})`,
    });
  }
  for (const a of c.affinity ?? []) {
    if (a.vcpu >= c.max_vcpus) {
      ctx.addIssue({
        code: z.ZodIssueCode.custom,
        path: ["affinity"],
        message: `affinity names vCPU ${a.vcpu}, beyond max_vcpus (${c.max_vcpus})`,
      });
    }
  }
  const t = c.topology;
  // Only a topology whose members passed their own checks (else its product says nothing useful).
  const counts = t ? [t.threads_per_core, t.cores_per_die, t.dies_per_package, t.packages] : [];
  if (t && counts.every((n) => Number.isSafeInteger(n) && n > 0)) {
    const total = t.threads_per_core * t.cores_per_die * t.dies_per_package * t.packages;
    if (total !== c.max_vcpus) {
      ctx.addIssue({
        code: z.ZodIssueCode.custom,
        path: ["topology"],
        message: `topology describes ${total} vCPUs but max_vcpus is ${c.max_vcpus}`,
      });
    }
  }
});

const PAGE = 4096;
const memSize = () => u64().refine((n) => n % PAGE === 0, `must be a multiple of ${PAGE} bytes (one page)`);

export const MemoryZoneConfigSchema = z.object({
  id: nonEmpty("id"),
  size: memSize().refine((n) => n > 0, "must be greater than zero"),
  file: z.string().optional(),
  mergeable: z.boolean().default(false),
  shared: z.boolean().default(false),
  hugepages: z.boolean().default(false),
  hugepage_size: u64().optional(),
  host_numa_node: u32().optional(),
  hotplug_size: memSize().optional(),
  hotplugged_size: memSize().optional(),
  prefault: z.boolean().default(false),
  reserve: z.boolean().default(false),
});

export const MemoryConfigSchema = z.object({
  size: memSize(),
  hotplug_size: memSize().optional(),
  hotplugged_size: memSize().optional(),
  mergeable: z.boolean().default(false),
  hotplug_method: z.enum(["Acpi", "VirtioMem"]).default("Acpi"),
  shared: z.boolean().default(false),
  hugepages: z.boolean().default(false),
  hugepage_size: u64().optional(),
  prefault: z.boolean().default(false),
  reserve: z.boolean().default(false),
  thp: z.boolean().default(true),
  zones: z.array(MemoryZoneConfigSchema).optional(),
}).superRefine((m, ctx) => {
  const issue = (path: string, message: string) =>
    ctx.addIssue({ code: z.ZodIssueCode.custom, path: [path], message });
  if (m.size === 0 && !(m.zones && m.zones.length > 0)) {
    issue("size", "must be greater than zero unless memory zones are given");
  }
  if (m.hugepage_size !== undefined) {
    if (!m.hugepages) issue("hugepage_size", "hugepage_size requires hugepages to be enabled");
    if (!isPowerOfTwo(m.hugepage_size)) issue("hugepage_size", "must be a power of two");
  }
  if (m.hotplugged_size !== undefined && m.hotplug_size === undefined) {
    issue("hotplugged_size", "hotplugged_size requires hotplug_size");
  }
  if (m.hotplugged_size !== undefined && m.hotplug_size !== undefined && m.hotplugged_size > m.hotplug_size) {
    issue("hotplugged_size", "hotplugged_size must not exceed hotplug_size");
  }
  const ids = new Set<string>();
  for (const zone of m.zones ?? []) {
    if (ids.has(zone.id)) issue("zones", `memory zone id '${zone.id}' is used twice`);
    ids.add(zone.id);
  }
});

export const PayloadConfigSchema = z.object({
  firmware: z.string().optional(),
  kernel: z.string().optional(),
  cmdline: z.string().optional(),
  initramfs: z.string().optional(),
  igvm: z.string().optional(),
  host_data: z.string().optional(),
}).superRefine((p, ctx) => {
  if (p.kernel === undefined && p.firmware === undefined && p.igvm === undefined) {
    ctx.addIssue({
      code: z.ZodIssueCode.custom,
      message: "a kernel, firmware or igvm payload is required",
    });
  }
});

export const TokenBucketSchema = z.object({
  size: u64(),
  one_time_burst: u64().optional(),
  refill_time: u64(),
});

/** The one object Cloud Hypervisor reads strictly (serde deny_unknown_fields). */
export const RateLimiterConfigSchema = z.object({
  bandwidth: TokenBucketSchema.optional(),
  ops: TokenBucketSchema.optional(),
}).strict();

export const RateLimitGroupConfigSchema = z.object({
  id: nonEmpty("id"),
  rate_limiter_config: RateLimiterConfigSchema,
});

export const VirtQueueAffinitySchema = z.object({ queue_index: u16(), host_cpus: z.array(u32()) });

export const DiskConfigSchema = z.object({
  ...pciCommon(),
  path: z.string().optional(),
  readonly: z.boolean().default(false),
  direct: z.boolean().default(false),
  num_queues: int().min(1).max(256).default(1),
  queue_size: queueSize(128),
  vhost_user: z.boolean().default(false),
  vhost_socket: z.string().optional(),
  rate_limiter_config: RateLimiterConfigSchema.optional(),
  serial: z.string().max(20, "must be at most 20 bytes (virtio-blk serial)").optional(),
  rate_limit_group: z.string().optional(),
  queue_affinity: z.array(VirtQueueAffinitySchema).optional(),
  backing_files: z.boolean().default(false),
  sparse: z.boolean().default(true),
  /** `Unknown` until boot, when the image's own format is filled in. */
  image_type: z.enum(["FlatVmdk", "FixedVhd", "Qcow2", "Raw", "Vhdx", "Unknown"]).default("Unknown"),
  lock_granularity: z.enum(["ByteRange", "Full"]).default("ByteRange"),
  /** Cloud Hypervisor's test switches (not in its document, but in every vm.info it writes). */
  disable_io_uring: z.boolean().default(false),
  disable_aio: z.boolean().default(false),
}).superRefine((d, ctx) => {
  if (d.vhost_user) {
    if (d.vhost_socket === undefined) {
      ctx.addIssue({
        code: z.ZodIssueCode.custom,
        path: ["vhost_socket"],
        message: "vhost_user disks need a vhost_socket",
      });
    }
  } else if (d.path === undefined) {
    ctx.addIssue({ code: z.ZodIssueCode.custom, path: ["path"], message: "a disk needs a path" });
  }
  if (d.rate_limiter_config && d.rate_limit_group) {
    ctx.addIssue({
      code: z.ZodIssueCode.custom,
      path: ["rate_limit_group"],
      message: "rate_limiter_config and rate_limit_group are mutually exclusive",
    });
  }
});

const MAC_RE = /^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/;
const mac = () => z.string().regex(MAC_RE, "must be a MAC address like 12:34:56:78:90:ab");
const IPV4_RE = /^((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)$/;
const IPV6_RE = /^[0-9a-fA-F:.]*:[0-9a-fA-F:.]*$/;
const ipAddr = () =>
  z.string().refine((s) => IPV4_RE.test(s) || IPV6_RE.test(s), "must be an IPv4 or IPv6 address");

export const NetConfigSchema = z.object({
  ...pciCommon(),
  tap: z.string().max(15, "must be at most 15 characters (IFNAMSIZ)").optional(),
  /** Host side of a tap dvmm creates; none by default, as Cloud Hypervisor's code (not its document). */
  ip: ipAddr().optional(),
  mask: ipAddr().optional(),
  /** The guest's MAC; a random one is chosen and recorded at boot when none is given. */
  mac: mac().optional(),
  host_mac: mac().optional(),
  mtu: int().min(1280).max(65535).optional(),
  num_queues: int().min(2).max(512).refine(
    (n) => n % 2 === 0,
    "must be even (one RX and one TX queue per pair)",
  )
    .default(2),
  queue_size: queueSize(256),
  vhost_user: z.boolean().default(false),
  vhost_socket: z.string().optional(),
  vhost_mode: z.enum(["Client", "Server"]).default("Client"),
  rate_limiter_config: RateLimiterConfigSchema.optional(),
  offload_tso: z.boolean().default(true),
  offload_ufo: z.boolean().default(true),
  offload_csum: z.boolean().default(true),
  /**
   * Already-open tap descriptors (Cloud Hypervisor has the field, off its document): from the command
   * line (`--net fd=3`) or sent with `vm.add-net` as SCM_RIGHTS. A JSON body cannot carry them.
   */
  fds: z.array(int().min(0)).optional(),
}).superRefine((n, ctx) => {
  if (n.vhost_user && n.vhost_socket === undefined) {
    ctx.addIssue({
      code: z.ZodIssueCode.custom,
      path: ["vhost_socket"],
      message: "vhost_user network devices need a vhost_socket",
    });
  }
  if (n.fds && n.tap) {
    ctx.addIssue({
      code: z.ZodIssueCode.custom,
      path: ["fds"],
      message: "fds and tap are mutually exclusive",
    });
  }
  if (n.fds && n.fds.length * 2 !== n.num_queues) {
    ctx.addIssue({
      code: z.ZodIssueCode.custom,
      path: ["fds"],
      message:
        `${n.fds.length} tap descriptor(s) for num_queues=${n.num_queues}: one descriptor per queue pair`,
    });
  }
  if ((n.ip === undefined) !== (n.mask === undefined)) {
    ctx.addIssue({
      code: z.ZodIssueCode.custom,
      path: [n.ip === undefined ? "ip" : "mask"],
      message: "ip and mask go together: give both or neither",
    });
  } else if (n.ip !== undefined && n.ip.includes(":") !== n.mask!.includes(":")) {
    ctx.addIssue({
      code: z.ZodIssueCode.custom,
      path: ["mask"],
      message: "ip and mask must both be IPv4 or both be IPv6",
    });
  }
  if (!n.offload_csum && (n.offload_tso || n.offload_ufo)) {
    ctx.addIssue({
      code: z.ZodIssueCode.custom,
      path: ["offload_csum"],
      message: "offload_tso and offload_ufo need offload_csum",
    });
  }
});

export const RngConfigSchema = z.object({
  ...pciCommon(),
  src: nonEmpty("src"),
});

export const RtcConfigSchema = z.object({
  ...pciCommon(),
});

export const BalloonConfigSchema = z.object({
  ...pciCommon(),
  size: u64(),
  deflate_on_oom: z.boolean().default(false),
  free_page_reporting: z.boolean().default(false),
});

export const FsConfigSchema = z.object({
  ...pciCommon(),
  tag: nonEmpty("tag").max(36, "must be at most 36 bytes (virtio-fs tag)"),
  socket: nonEmpty("socket"),
  num_queues: int().min(1).max(256).default(1),
  queue_size: queueSize(1024),
});

export const GenericVhostUserConfigSchema = z.object({
  ...pciCommon(),
  socket: nonEmpty("socket"),
  queue_sizes: z.array(u16()).min(1, "at least one queue is needed"),
  device_type: u32(),
});

export const PmemConfigSchema = z.object({
  ...pciCommon(),
  file: nonEmpty("file"),
  size: u64().optional(),
  discard_writes: z.boolean().default(false),
});

export const ConsoleModeSchema = z.enum(["Off", "Pty", "Tty", "File", "Socket", "Null"]);
export type ConsoleMode = z.infer<typeof ConsoleModeSchema>;

function checkOutputTarget(
  c: { mode: ConsoleMode; file?: string; socket?: string },
  ctx: z.RefinementCtx,
): void {
  if (c.mode === "File" && c.file === undefined) {
    ctx.addIssue({ code: z.ZodIssueCode.custom, path: ["file"], message: "mode File needs a file" });
  }
  // In Pty mode Cloud Hypervisor records the pseudo-terminal's path in `file`.
  if (c.mode !== "File" && c.mode !== "Pty" && c.file !== undefined) {
    ctx.addIssue({
      code: z.ZodIssueCode.custom,
      path: ["file"],
      message: "file is only valid with mode File (or Pty, where it is the terminal's path)",
    });
  }
  if (c.mode === "Socket" && c.socket === undefined) {
    ctx.addIssue({ code: z.ZodIssueCode.custom, path: ["socket"], message: "mode Socket needs a socket" });
  }
  if (c.mode !== "Socket" && c.socket !== undefined) {
    ctx.addIssue({
      code: z.ZodIssueCode.custom,
      path: ["socket"],
      message: "socket is only valid with mode Socket",
    });
  }
}

export const ConsoleConfigSchema = z.object({
  ...pciCommon(),
  file: z.string().optional(),
  socket: z.string().optional(),
  mode: ConsoleModeSchema,
}).superRefine(checkOutputTarget);

export const SerialConfigSchema = z.object({
  file: z.string().optional(),
  socket: z.string().optional(),
  mode: ConsoleModeSchema,
}).superRefine(checkOutputTarget);

export const DebugConsoleConfigSchema = z.object({
  file: z.string().optional(),
  mode: ConsoleModeSchema,
  iobase: u16().optional(),
}).superRefine((c, ctx) => {
  if (c.mode === "Socket") {
    ctx.addIssue({
      code: z.ZodIssueCode.custom,
      path: ["mode"],
      message: "the debug console has no Socket mode",
    });
  }
  checkOutputTarget(c, ctx);
});

export const DeviceConfigSchema = z.object({
  ...pciCommon(),
  path: nonEmpty("path").optional(),
  /** An open VFIO cdev descriptor (Cloud Hypervisor has it, off its document). */
  fd: int().optional(),
  x_nv_gpudirect_clique: int().min(0).max(255).optional(),
  x_exclude_mmap_bars: z.array(u64()).default([]),
}).superRefine((d, ctx) => {
  if ((d.path === undefined) === (d.fd === undefined)) {
    ctx.addIssue({ code: z.ZodIssueCode.custom, path: ["path"], message: "give exactly one of path or fd" });
  }
});

export const UserDeviceConfigSchema = z.object({
  ...pciCommon(),
  socket: nonEmpty("socket"),
});

export const TpmConfigSchema = z.object({ socket: nonEmpty("socket") });

export const VdpaConfigSchema = z.object({
  ...pciCommon(),
  path: nonEmpty("path"),
  num_queues: int().min(1).max(256).default(1),
});

export const VsockConfigSchema = z.object({
  ...pciCommon(),
  cid: u64().min(3, "guest CIDs 0, 1 and 2 are reserved; use 3 or more").max(
    0xffff_fffe,
    "CID 0xffffffff is reserved",
  ),
  socket: nonEmpty("socket"),
});

export const NumaDistanceSchema = z.object({ destination: u32().default(0), distance: u8().default(0) });
export const NumaConfigSchema = z.object({
  guest_numa_id: u32(),
  cpus: z.array(u32()).optional(),
  distances: z.array(NumaDistanceSchema).optional(),
  memory_zones: z.array(z.string()).optional(),
  pci_segments: z.array(pciSegment()).optional(),
  device_id: z.string().optional(),
});

export const PciSegmentConfigSchema = z.object({
  pci_segment: pciSegment().default(0),
  mmio32_aperture_weight: u32().min(1).default(1),
  mmio64_aperture_weight: u32().min(1).default(1),
});

export const PlatformConfigSchema = z.object({
  num_pci_segments: int().min(1).max(96).default(1),
  iommu_segments: z.array(pciSegment()).optional(),
  iommu_address_width_bits: int().min(0).max(64).default(64),
  system_serial_number: z.string().optional(),
  /** Deprecated spelling of system_serial_number: read, never written. */
  serial_number: z.string().optional(),
  system_uuid: z.string().optional(),
  /** Deprecated spelling of system_uuid: read, never written. */
  uuid: z.string().optional(),
  oem_strings: z.array(z.string()).optional(),
  system_manufacturer: z.string().optional(),
  system_product_name: z.string().optional(),
  system_version: z.string().optional(),
  system_family: z.string().optional(),
  system_sku_number: z.string().optional(),
  chassis_asset_tag: z.string().optional(),
  tdx: z.boolean().default(false),
  sev_snp: z.boolean().default(false),
  iommufd: z.boolean().default(false),
  /** An open iommufd descriptor (Cloud Hypervisor has it, off its document). */
  iommufd_fd: int().optional(),
  vfio_p2p_dma: z.boolean().default(true),
}).transform(({ serial_number, uuid, ...p }) => {
  if (p.system_serial_number === undefined && serial_number !== undefined) {
    p.system_serial_number = serial_number;
  }
  if (p.system_uuid === undefined && uuid !== undefined) p.system_uuid = uuid;
  return p;
});

export const LandlockConfigSchema = z.object({
  path: nonEmpty("path"),
  access: z.enum(["r", "w", "rw", "wr"], { message: "access must be r, w or rw" }),
});

const DEFAULT_MEMORY = 512 * 1024 * 1024;

const VmConfigObject = z.object({
  cpus: CpusConfigSchema.default({ boot_vcpus: 1, max_vcpus: 1 }),
  memory: MemoryConfigSchema.default({ size: DEFAULT_MEMORY }),
  payload: PayloadConfigSchema,
  rate_limit_groups: z.array(RateLimitGroupConfigSchema).optional(),
  disks: z.array(DiskConfigSchema).optional(),
  net: z.array(NetConfigSchema).optional(),
  rng: RngConfigSchema.default({ src: "/dev/urandom" }),
  balloon: BalloonConfigSchema.optional(),
  fs: z.array(FsConfigSchema).optional(),
  generic_vhost_user: z.array(GenericVhostUserConfigSchema).optional(),
  pmem: z.array(PmemConfigSchema).optional(),
  serial: SerialConfigSchema.default({ mode: "Null" }),
  console: ConsoleConfigSchema.default({ mode: "Tty" }),
  debug_console: DebugConsoleConfigSchema.default({ mode: "Off", iobase: 0xe9 }),
  devices: z.array(DeviceConfigSchema).optional(),
  user_devices: z.array(UserDeviceConfigSchema).optional(),
  vdpa: z.array(VdpaConfigSchema).optional(),
  vsock: VsockConfigSchema.optional(),
  numa: z.array(NumaConfigSchema).optional(),
  iommu: z.boolean().default(false),
  watchdog: z.boolean().default(false),
  rtc: RtcConfigSchema.optional(),
  pvpanic: z.boolean().default(false),
  pci_segments: z.array(PciSegmentConfigSchema).optional(),
  platform: PlatformConfigSchema.optional(),
  tpm: TpmConfigSchema.optional(),
  landlock_enable: z.boolean().default(false),
  landlock_rules: z.array(LandlockConfigSchema).optional(),
});

/** Every PCI device config of a VM, with where it sits (lists, then the single devices). */
function pciDevices(c: z.infer<typeof VmConfigObject>): { d: PciCommon; where: (string | number)[] }[] {
  const out: { d: PciCommon; where: (string | number)[] }[] = [];
  for (
    const key of [
      "disks",
      "net",
      "fs",
      "pmem",
      "devices",
      "user_devices",
      "vdpa",
      "generic_vhost_user",
    ] as const
  ) {
    (c[key] as PciCommon[] | undefined)?.forEach((d, i) => out.push({ d, where: [key, i] }));
  }
  for (const key of ["vsock", "rng", "balloon", "console", "rtc"] as const) {
    const d = c[key] as PciCommon | undefined;
    if (d) out.push({ d, where: [key] });
  }
  return out;
}
type PciCommon = { id?: string; iommu: boolean; pci_segment: number; pci_device_id?: number };

/** Rules that involve more than one part of the VM configuration. */
function checkVmConfig(c: z.infer<typeof VmConfigObject>, ctx: z.RefinementCtx): void {
  const issue = (path: (string | number)[], message: string) =>
    ctx.addIssue({ code: z.ZodIssueCode.custom, path, message });
  if (c.serial.mode === "Tty" && c.console.mode === "Tty") {
    issue(["console", "mode"], "serial and console cannot both use the terminal (Tty); pick one");
  }
  const seen = new Map<string, string>();
  for (const { id, where } of deviceIds(c)) {
    const prev = seen.get(id);
    if (prev !== undefined) {
      issue([where.split("[")[0]], `identifier '${id}' is used by both ${prev} and ${where}`);
    } else seen.set(id, where);
  }
  const needShared = (what: string) =>
    issue(
      [what],
      `${what} with vhost-user needs shared memory (memory.shared=true or memory zones with shared)`,
    );
  // As Cloud Hypervisor: hugepages are shared too; with size 0 every zone must be.
  const zones = c.memory.zones ?? [];
  const shared = c.memory.shared || c.memory.hugepages ||
    (c.memory.size === 0 && zones.length > 0 && zones.every((z) => z.shared || z.hugepages));
  if (!shared) {
    if (c.fs && c.fs.length > 0) needShared("fs");
    if (c.disks?.some((d) => d.vhost_user)) needShared("disks");
    if (c.net?.some((n) => n.vhost_user)) needShared("net");
    if (c.generic_vhost_user && c.generic_vhost_user.length > 0) needShared("generic_vhost_user");
    if (c.user_devices && c.user_devices.length > 0) needShared("user_devices");
  }
  const groups = new Set((c.rate_limit_groups ?? []).map((g) => g.id));
  c.disks?.forEach((d, i) => {
    if (d.rate_limit_group !== undefined && !groups.has(d.rate_limit_group)) {
      issue(["disks", i, "rate_limit_group"], `rate limit group '${d.rate_limit_group}' is not defined`);
    }
  });
  if (c.payload.initramfs !== undefined && c.payload.kernel === undefined) {
    issue(["payload", "initramfs"], "an initramfs needs a kernel");
  }
  const segments = c.platform?.num_pci_segments ?? 1;
  for (const { d, where } of pciDevices(c)) {
    if (d.pci_segment >= segments) {
      issue(
        [...where, "pci_segment"],
        `PCI segment ${d.pci_segment} does not exist (num_pci_segments=${segments})`,
      );
    }
    if (d.pci_device_id === 0 && d.pci_segment === 0) {
      issue([...where, "pci_device_id"], "device 0 of PCI segment 0 is the host bridge");
    }
  }
  // 32 slots per PCI bus, slot 0 the host bridge: more devices than that cannot be placed (and a
  // config naming thousands is refused before it costs anything).
  const perSegment = new Map<number, number>();
  for (const { d, where } of pciDevices(c)) {
    if (where[0] === "console" && c.console.mode === "Off") continue;
    perSegment.set(d.pci_segment, (perSegment.get(d.pci_segment) ?? 0) + 1);
  }
  for (const [seg, n] of perSegment) {
    if (n > 31) issue(["pci_segment"], `${n} PCI devices on segment ${seg}: a segment has 31 device slots`);
  }
  c.pci_segments?.forEach((p, i) => {
    if (p.pci_segment >= segments) {
      issue(
        ["pci_segments", i, "pci_segment"],
        `PCI segment ${p.pci_segment} does not exist (num_pci_segments=${segments})`,
      );
    }
  });
  const ram = c.memory.size + zones.reduce((n, z) => n + z.size, 0) + (c.memory.hotplugged_size ?? 0);
  if (c.balloon && c.balloon.size >= ram) {
    issue(["balloon", "size"], "the balloon must be smaller than guest memory");
  }
  // As Cloud Hypervisor: no more virtio-net queue pairs than boot vCPUs.
  c.net?.forEach((n, i) => {
    if (n.num_queues / 2 > c.cpus.boot_vcpus) {
      const pairs = n.num_queues / 2;
      issue(
        ["net", i, "num_queues"],
        `num_queues=${n.num_queues} is ${pairs} queue pairs, more than the ${c.cpus.boot_vcpus} boot vCPU(s)`,
      );
    }
  });
}

/**
 * The VM configuration. As Cloud Hypervisor reports it, the VM-wide `iommu` is on when any device's
 * is (or when IOMMU segments are given).
 */
export const VmConfigSchema = VmConfigObject.superRefine(checkVmConfig).transform((c) => {
  if (!c.iommu && (pciDevices(c).some(({ d }) => d.iommu) || c.platform?.iommu_segments !== undefined)) {
    c.iommu = true;
  }
  return c;
});

// ---------------------------------------------------------------------------------------------------
// Identities given at boot, and the config as vm.info reports it

/** Prefixes of the identifiers Cloud Hypervisor generates, one counter shared by all of them. */
const ID_PREFIXES = [
  ["disks", "_disk"],
  ["net", "_net"],
  ["generic_vhost_user", "_generic_vhost_user"],
  ["fs", "_fs"],
  ["pmem", "_pmem"],
  ["vsock", "_vsock"],
  ["vdpa", "_vdpa"],
  ["devices", "_vfio"],
  ["user_devices", "_vfio_user"],
] as const;

/** A random locally administered unicast MAC (`2e:…`, as Cloud Hypervisor's). */
function randomMac(): string {
  const b = crypto.getRandomValues(new Uint8Array(5));
  return ["2e", ...Array.from(b, (x) => x.toString(16).padStart(2, "0"))].join(":");
}

/**
 * The config with what boot decides written into it, as Cloud Hypervisor does: an identifier for each
 * device without one (`_disk0`, `_net1`, …: one counter for all kinds, in creation order, skipping
 * names in use) and a MAC for each network device without one. `counter` is where numbering goes on
 * (it never goes back, so a removed device's name is not given again); the new value is returned.
 */
export function withBootIdentities(config: VmConfig, counter: number): { config: VmConfig; counter: number } {
  const next = structuredClone(config);
  const used = new Set(deviceIds(next).map((d) => d.id));
  for (const [key, prefix] of ID_PREFIXES) {
    const v = next[key] as { id?: string }[] | { id?: string } | undefined;
    for (const d of Array.isArray(v) ? v : v ? [v] : []) {
      if (d.id !== undefined) continue;
      let name: string;
      do name = `${prefix}${counter++}`; while (used.has(name));
      used.add(name);
      d.id = name;
    }
  }
  for (const n of next.net ?? []) n.mac ??= randomMac();
  return { config: next, counter };
}

/**
 * The config as vm.info reports it, field for field as Cloud Hypervisor writes it: absent options are
 * left out (never null), and a device's `iommu` only appears when it is on.
 */
export function vmInfoConfig(config: VmConfig): Record<string, unknown> {
  const out = structuredClone(config) as VmConfig;
  for (const { d } of pciDevices(out)) {
    if (!d.iommu) delete (d as { iommu?: boolean }).iommu;
  }
  // The rate limiter is the one place Cloud Hypervisor writes nulls for what is not set.
  const limiters = [
    ...(out.disks ?? []).map((d) => d.rate_limiter_config),
    ...(out.net ?? []).map((n) => n.rate_limiter_config),
    ...(out.rate_limit_groups ?? []).map((g) => g.rate_limiter_config),
  ];
  for (const l of limiters) {
    if (!l) continue;
    const w = l as Record<string, unknown>;
    w.bandwidth ??= null;
    w.ops ??= null;
    for (const b of [l.bandwidth, l.ops]) if (b) (b as Record<string, unknown>).one_time_burst ??= null;
  }
  return out as unknown as Record<string, unknown>;
}

// ---------------------------------------------------------------------------------------------------
// Request bodies of the VM actions

export const VmResizeSchema = z.object({
  desired_vcpus: int().min(1).max(255).optional(),
  desired_ram: memSize().optional(),
  desired_balloon: u64().optional(),
}).refine(
  (r) => r.desired_vcpus !== undefined || r.desired_ram !== undefined || r.desired_balloon !== undefined,
  "at least one of desired_vcpus, desired_ram or desired_balloon is required",
);

export const VmResizeZoneSchema = z.object({ id: nonEmpty("id"), desired_ram: memSize() });
export const VmResizeDiskSchema = z.object({ id: nonEmpty("id"), desired_size: u64() });
export const VmRemoveDeviceSchema = z.object({ id: nonEmpty("id") });
export const VmSnapshotConfigSchema = z.object({ destination_url: nonEmpty("destination_url") });
export const VmCoredumpDataSchema = z.object({ destination_url: nonEmpty("destination_url") });

export const VmMemoryZoneUpdateDataSchema = z.object({ id: nonEmpty("id"), host_numa_node: u32() });

/** Taps for a restored network device: sent with the request as SCM_RIGHTS, `num_fds` of them. */
export const RestoredNetConfigSchema = z.object({
  id: nonEmpty("id"),
  num_fds: int().min(0).default(0),
  fds: z.array(int()).optional(),
});
export const RestoredVfioConfigSchema = z.object({ id: nonEmpty("id"), fd: int().optional() });

export const RestoreConfigSchema = z.object({
  source_url: nonEmpty("source_url"),
  prefault: z.boolean().default(false),
  memory_restore_mode: z.enum(["Copy", "OnDemand"]).default("Copy"),
  net_fds: z.array(RestoredNetConfigSchema).optional(),
  vfio_fds: z.array(RestoredVfioConfigSchema).optional(),
  iommufd_fd: int().optional(),
  resume: z.boolean().default(false),
  zone_updates: z.array(VmMemoryZoneUpdateDataSchema).default([]),
});

const MigrationModeSchema = z.enum(["Precopy", "Postcopy"]).default("Precopy");

export const ReceiveMigrationDataSchema = z.object({
  receiver_url: nonEmpty("receiver_url"),
  tls_dir: z.string().optional(),
  memory_mode: MigrationModeSchema,
  vfio_fds: z.array(RestoredVfioConfigSchema).optional(),
  iommufd_fd: int().optional(),
  zone_updates: z.array(VmMemoryZoneUpdateDataSchema).default([]),
});

export const SendMigrationDataSchema = z.object({
  destination_url: nonEmpty("destination_url"),
  local: z.boolean().default(false),
  preserve_source: z.boolean().default(false),
  downtime_ms: int().min(1).default(300),
  timeout_s: int().min(1).default(3600),
  timeout_strategy: z.enum(["Cancel", "Ignore"]).default("Cancel"),
  connections: int().min(1).max(128).default(1),
  tls_dir: z.string().optional(),
  memory_mode: MigrationModeSchema,
});

/** Body of /vm.add-user-device: the document's VmAddUserDevice plus the optional `id` of UserDeviceConfig. */
export const VmAddUserDeviceSchema = UserDeviceConfigSchema;
/** Body of /vm.add-device (the document points it at DeviceConfig). */
export const VmAddDeviceSchema = DeviceConfigSchema;

// ---------------------------------------------------------------------------------------------------
// Types

export type VmConfig = z.infer<typeof VmConfigSchema>;
export type VmConfigInput = z.input<typeof VmConfigSchema>;
export type CpusConfig = z.infer<typeof CpusConfigSchema>;
export type MemoryConfig = z.infer<typeof MemoryConfigSchema>;
export type PayloadConfig = z.infer<typeof PayloadConfigSchema>;
export type DiskConfig = z.infer<typeof DiskConfigSchema>;
export type NetConfig = z.infer<typeof NetConfigSchema>;
export type RngConfig = z.infer<typeof RngConfigSchema>;
export type BalloonConfig = z.infer<typeof BalloonConfigSchema>;
export type FsConfig = z.infer<typeof FsConfigSchema>;
export type PmemConfig = z.infer<typeof PmemConfigSchema>;
export type ConsoleConfig = z.infer<typeof ConsoleConfigSchema>;
export type SerialConfig = z.infer<typeof SerialConfigSchema>;
export type DeviceConfig = z.infer<typeof DeviceConfigSchema>;
export type UserDeviceConfig = z.infer<typeof UserDeviceConfigSchema>;
export type VdpaConfig = z.infer<typeof VdpaConfigSchema>;
export type VsockConfig = z.infer<typeof VsockConfigSchema>;
export type GenericVhostUserConfig = z.infer<typeof GenericVhostUserConfigSchema>;
export type VmResize = z.infer<typeof VmResizeSchema>;
export type VmResizeZone = z.infer<typeof VmResizeZoneSchema>;
export type VmResizeDisk = z.infer<typeof VmResizeDiskSchema>;
export type VmRemoveDevice = z.infer<typeof VmRemoveDeviceSchema>;
export type VmSnapshotConfig = z.infer<typeof VmSnapshotConfigSchema>;
export type VmCoredumpData = z.infer<typeof VmCoredumpDataSchema>;
export type RestoreConfig = z.infer<typeof RestoreConfigSchema>;
export type ReceiveMigrationData = z.infer<typeof ReceiveMigrationDataSchema>;
export type SendMigrationData = z.infer<typeof SendMigrationDataSchema>;

export type VmState = "Created" | "Running" | "Shutdown" | "Paused";

export interface PciDeviceInfo {
  id: string;
  bdf: string;
}

export interface VmInfo {
  config: VmConfig;
  state: VmState;
  memory_actual_size?: number;
  device_tree?: Record<string, unknown>;
}

export interface VmmPingResponse {
  build_version?: string;
  version: string;
  pid?: number;
  features?: string[];
}

// ---------------------------------------------------------------------------------------------------
// Error formatting

/** One human-readable line per problem, naming the field (dotted path) and the reason. */
export function formatZodError(err: z.ZodError, what: string): string[] {
  return err.issues.map((i) => {
    const at = i.path.length > 0 ? i.path.join(".") : what;
    if (i.code === z.ZodIssueCode.unrecognized_keys) {
      const where = i.path.length > 0 ? ` in ${i.path.join(".")}` : "";
      return `${what}: unknown field${i.keys.length > 1 ? "s" : ""} ${
        i.keys.map((k) => `'${k}'`).join(", ")
      }${where}`;
    }
    if (i.code === z.ZodIssueCode.invalid_type && i.received === "undefined") {
      return `${at}: required field is missing`;
    }
    return `${at}: ${i.message}`;
  });
}

/** `value` with every object member whose value is `null` left out (Cloud Hypervisor: null is None). */
export function dropNulls(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(dropNulls);
  if (value === null || typeof value !== "object") return value;
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(value)) if (v !== null) out[k] = dropNulls(v);
  return out;
}

function innerSchema(s: z.ZodTypeAny): z.ZodTypeAny {
  for (;;) {
    if (s instanceof z.ZodEffects) s = s.innerType();
    else if (s instanceof z.ZodDefault) s = s.removeDefault();
    else if (s instanceof z.ZodOptional || s instanceof z.ZodNullable) s = s.unwrap();
    else return s;
  }
}

/** Dotted paths of the members of `value` that `schema` does not know. */
export function unknownFields(schema: z.ZodTypeAny, value: unknown, path = ""): string[] {
  const out: string[] = [];
  const s = innerSchema(schema);
  if (s instanceof z.ZodObject && value !== null && typeof value === "object" && !Array.isArray(value)) {
    const shape = s.shape as Record<string, z.ZodTypeAny>;
    for (const [k, v] of Object.entries(value)) {
      const at = path ? `${path}.${k}` : k;
      if (!Object.hasOwn(shape, k)) out.push(at);
      else out.push(...unknownFields(shape[k], v, at));
    }
  } else if (s instanceof z.ZodArray && Array.isArray(value)) {
    value.forEach((v, i) => out.push(...unknownFields(s.element, v, `${path}[${i}]`)));
  }
  return out;
}

/**
 * Read a configuration (or action body) as Cloud Hypervisor does: `null` members are absent, unknown
 * members are left out and each one is passed to `onUnknown`; everything else must be valid.
 */
export function readConfig<S extends z.ZodTypeAny>(
  schema: S,
  json: unknown,
  what: string,
  onUnknown: (field: string) => void = () => {},
): { ok: true; value: z.infer<S> } | { ok: false; problems: string[] } {
  const value = dropNulls(json);
  unknownFields(schema, value).forEach(onUnknown);
  const r = schema.safeParse(value);
  return r.success ? { ok: true, value: r.data } : { ok: false, problems: formatZodError(r.error, what) };
}

/** Parse `value` with `schema`; on failure throw a {@link SchemaError} carrying per-field messages. */
export function parseWith<S extends z.ZodTypeAny>(schema: S, value: unknown, what: string): z.infer<S> {
  const r = schema.safeParse(value);
  if (!r.success) throw new SchemaError(what, formatZodError(r.error, what));
  return r.data;
}

export class SchemaError extends Error {
  constructor(readonly what: string, readonly problems: string[]) {
    super(`invalid ${what}: ${problems.join("; ")}`);
    this.name = "SchemaError";
  }
}
