/**
 * Request and configuration schemas of the REST API, shaped after Cloud Hypervisor's OpenAPI document
 * (field names, types, defaults). Every object rejects unknown fields. Cross-field rules (vCPU counts,
 * console modes, unique identifiers, ...) are checked on the whole VmConfig.
 *
 * The inferred output types (defaults applied) are what the rest of dvmm works with.
 */
import { z } from "zod";

// ---------------------------------------------------------------------------------------------------
// Scalar helpers

const int = () => z.number().int();
const u8 = () => int().min(0).max(255);
const u16 = () => int().min(0).max(65535);
const u32 = () => int().min(0).max(0xffff_ffff);
const i32 = () => int().min(-0x8000_0000).max(0x7fff_ffff);
/** A non-negative 64-bit quantity (bytes, ids); JSON numbers are exact up to 2^53. */
const u64 = () => int().min(0).max(Number.MAX_SAFE_INTEGER);
const pciSegment = () => u16();
/** Device number on a PCI bus: 5 bits. */
const pciDeviceId = () => int().min(0).max(31);
const nonEmpty = (what: string) => z.string().min(1, `${what} must not be empty`);

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}
const queueSize = (dflt: number) =>
  int().min(1).max(32768).refine(isPowerOfTwo, "must be a power of two").default(dflt);

// ---------------------------------------------------------------------------------------------------
// VmConfig parts

export const CpuAffinitySchema = z.object({ vcpu: u32(), host_cpus: z.array(u32()) }).strict();
export const CpuFeaturesSchema = z.object({ amx: z.boolean().optional() }).strict();
export const CpuTopologySchema = z.object({
  threads_per_core: u8().optional(),
  cores_per_die: u8().optional(),
  dies_per_package: u8().optional(),
  packages: u8().optional(),
}).strict();

export const CpusConfigSchema = z.object({
  boot_vcpus: int().min(1).max(255),
  max_vcpus: int().min(1).max(255),
  topology: CpuTopologySchema.optional(),
  kvm_hyperv: z.boolean().default(false),
  max_phys_bits: int().min(1).max(64).optional(),
  nested: z.boolean().default(true),
  affinity: z.array(CpuAffinitySchema).optional(),
  features: CpuFeaturesSchema.optional(),
  core_scheduling: z.enum(["Vm", "Vcpu", "Off"]).default("Vm"),
}).strict().superRefine((c, ctx) => {
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
  if (t && t.threads_per_core && t.cores_per_die && t.dies_per_package && t.packages) {
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
}).strict();

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
}).strict().superRefine((m, ctx) => {
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
}).strict().superRefine((p, ctx) => {
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
}).strict();

export const RateLimiterConfigSchema = z.object({
  bandwidth: TokenBucketSchema.optional(),
  ops: TokenBucketSchema.optional(),
}).strict();

export const RateLimitGroupConfigSchema = z.object({
  id: nonEmpty("id"),
  rate_limiter_config: RateLimiterConfigSchema,
}).strict();

export const VirtQueueAffinitySchema = z.object({ queue_index: u16(), host_cpus: z.array(u32()) }).strict();

export const DiskConfigSchema = z.object({
  path: z.string().optional(),
  readonly: z.boolean().default(false),
  direct: z.boolean().default(false),
  iommu: z.boolean().default(false),
  num_queues: int().min(1).max(256).default(1),
  queue_size: queueSize(128),
  vhost_user: z.boolean().default(false),
  vhost_socket: z.string().optional(),
  rate_limiter_config: RateLimiterConfigSchema.optional(),
  pci_segment: pciSegment().optional(),
  pci_device_id: pciDeviceId().optional(),
  id: nonEmpty("id").optional(),
  serial: z.string().max(20, "must be at most 20 bytes (virtio-blk serial)").optional(),
  rate_limit_group: z.string().optional(),
  queue_affinity: z.array(VirtQueueAffinitySchema).optional(),
  backing_files: z.boolean().default(false),
  sparse: z.boolean().default(true),
  image_type: z.enum(["FixedVhd", "Qcow2", "Raw", "Vhdx", "Unknown"]).optional(),
  lock_granularity: z.enum(["ByteRange", "Full"]).optional(),
}).strict().superRefine((d, ctx) => {
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
  tap: z.string().max(15, "must be at most 15 characters (IFNAMSIZ)").optional(),
  ip: ipAddr().default("192.168.249.1"),
  mask: ipAddr().default("255.255.255.0"),
  mac: mac().optional(),
  host_mac: mac().optional(),
  mtu: int().min(68).max(65535).optional(),
  iommu: z.boolean().default(false),
  num_queues: int().min(2).max(512).refine(
    (n) => n % 2 === 0,
    "must be even (one RX and one TX queue per pair)",
  )
    .default(2),
  queue_size: queueSize(256),
  vhost_user: z.boolean().default(false),
  vhost_socket: z.string().optional(),
  vhost_mode: z.enum(["Client", "Server"]).default("Client"),
  id: nonEmpty("id").optional(),
  pci_segment: pciSegment().optional(),
  pci_device_id: pciDeviceId().optional(),
  rate_limiter_config: RateLimiterConfigSchema.optional(),
  offload_tso: z.boolean().default(true),
  offload_ufo: z.boolean().default(true),
  offload_csum: z.boolean().default(true),
  /**
   * dvmm extension (Cloud Hypervisor keeps it off its document): already-open TAP file descriptors,
   * only meaningful from the command line (`--net fd=3`). The REST server refuses it in a body.
   */
  fds: z.array(int().min(0)).optional(),
}).strict().superRefine((n, ctx) => {
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
  if ((n.ip.includes(":")) !== (n.mask.includes(":"))) {
    ctx.addIssue({
      code: z.ZodIssueCode.custom,
      path: ["mask"],
      message: "ip and mask must both be IPv4 or both be IPv6",
    });
  }
});

export const RngConfigSchema = z.object({
  id: nonEmpty("id").optional(),
  pci_segment: pciSegment().optional(),
  pci_device_id: pciDeviceId().optional(),
  iommu: z.boolean().default(false),
  src: nonEmpty("src"),
}).strict();

export const RtcConfigSchema = z.object({
  id: nonEmpty("id").optional(),
  pci_segment: pciSegment().optional(),
  pci_device_id: pciDeviceId().optional(),
  iommu: z.boolean().default(false),
}).strict();

export const BalloonConfigSchema = z.object({
  id: nonEmpty("id").optional(),
  pci_segment: pciSegment().optional(),
  pci_device_id: pciDeviceId().optional(),
  iommu: z.boolean().default(false),
  size: u64(),
  deflate_on_oom: z.boolean().default(false),
  free_page_reporting: z.boolean().default(false),
}).strict();

export const FsConfigSchema = z.object({
  tag: nonEmpty("tag").max(36, "must be at most 36 bytes (virtio-fs tag)"),
  socket: nonEmpty("socket"),
  num_queues: int().min(1).max(256).default(1),
  queue_size: queueSize(1024),
  pci_segment: pciSegment().optional(),
  pci_device_id: pciDeviceId().optional(),
  id: nonEmpty("id").optional(),
}).strict();

export const GenericVhostUserConfigSchema = z.object({
  socket: nonEmpty("socket"),
  queue_sizes: z.array(u16()).min(1, "at least one queue is needed"),
  pci_segment: pciSegment().optional(),
  pci_device_id: pciDeviceId().optional(),
  id: nonEmpty("id").optional(),
  device_type: u32(),
}).strict();

export const PmemConfigSchema = z.object({
  file: nonEmpty("file"),
  size: u64().optional(),
  iommu: z.boolean().default(false),
  discard_writes: z.boolean().default(false),
  pci_segment: pciSegment().optional(),
  pci_device_id: pciDeviceId().optional(),
  id: nonEmpty("id").optional(),
}).strict();

export const ConsoleModeSchema = z.enum(["Off", "Pty", "Tty", "File", "Socket", "Null"]);
export type ConsoleMode = z.infer<typeof ConsoleModeSchema>;

function checkOutputTarget(
  c: { mode: ConsoleMode; file?: string; socket?: string },
  ctx: z.RefinementCtx,
): void {
  if (c.mode === "File" && c.file === undefined) {
    ctx.addIssue({ code: z.ZodIssueCode.custom, path: ["file"], message: "mode File needs a file" });
  }
  if (c.mode !== "File" && c.file !== undefined) {
    ctx.addIssue({
      code: z.ZodIssueCode.custom,
      path: ["file"],
      message: "file is only valid with mode File",
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
  file: z.string().optional(),
  socket: z.string().optional(),
  mode: ConsoleModeSchema,
  iommu: z.boolean().default(false),
  id: nonEmpty("id").optional(),
  pci_segment: pciSegment().optional(),
  pci_device_id: pciDeviceId().optional(),
}).strict().superRefine(checkOutputTarget);

export const SerialConfigSchema = z.object({
  file: z.string().optional(),
  socket: z.string().optional(),
  mode: ConsoleModeSchema,
}).strict().superRefine(checkOutputTarget);

export const DebugConsoleConfigSchema = z.object({
  file: z.string().optional(),
  mode: ConsoleModeSchema,
  iobase: u16().optional(),
}).strict().superRefine((c, ctx) => {
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
  path: nonEmpty("path"),
  iommu: z.boolean().default(false),
  pci_segment: pciSegment().optional(),
  pci_device_id: pciDeviceId().optional(),
  id: nonEmpty("id").optional(),
  x_nv_gpudirect_clique: int().min(-128).max(127).optional(),
  x_exclude_mmap_bars: z.array(u64()).optional(),
}).strict();

export const UserDeviceConfigSchema = z.object({
  socket: nonEmpty("socket"),
  id: nonEmpty("id").optional(),
  pci_segment: pciSegment().optional(),
  pci_device_id: pciDeviceId().optional(),
}).strict();

export const TpmConfigSchema = z.object({ socket: nonEmpty("socket") }).strict();

export const VdpaConfigSchema = z.object({
  path: nonEmpty("path"),
  num_queues: int().min(1).max(256).default(1),
  iommu: z.boolean().default(false),
  pci_segment: pciSegment().optional(),
  pci_device_id: pciDeviceId().optional(),
  id: nonEmpty("id").optional(),
}).strict();

export const VsockConfigSchema = z.object({
  cid: u64().min(3, "guest CIDs 0, 1 and 2 are reserved; use 3 or more").max(0xffff_fffe),
  socket: nonEmpty("socket"),
  iommu: z.boolean().default(false),
  pci_segment: pciSegment().optional(),
  pci_device_id: pciDeviceId().optional(),
  id: nonEmpty("id").optional(),
}).strict();

export const NumaDistanceSchema = z.object({ destination: i32(), distance: i32() }).strict();
export const NumaConfigSchema = z.object({
  guest_numa_id: i32(),
  cpus: z.array(i32()).optional(),
  distances: z.array(NumaDistanceSchema).optional(),
  memory_zones: z.array(z.string()).optional(),
  pci_segments: z.array(i32()).optional(),
  device_id: z.string().optional(),
}).strict();

export const PciSegmentConfigSchema = z.object({
  pci_segment: pciSegment(),
  mmio32_aperture_weight: u32().optional(),
  mmio64_aperture_weight: u32().optional(),
}).strict();

export const PlatformConfigSchema = z.object({
  num_pci_segments: int().min(1).max(96).optional(),
  iommu_segments: z.array(pciSegment()).optional(),
  iommu_address_width_bits: u8().optional(),
  system_serial_number: z.string().optional(),
  serial_number: z.string().optional(),
  system_uuid: z.string().optional(),
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
  vfio_p2p_dma: z.boolean().default(true),
}).strict();

export const LandlockConfigSchema = z.object({
  path: nonEmpty("path"),
  access: z.enum(["r", "w", "rw"], { message: "access must be r, w or rw" }),
}).strict();

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
  debug_console: DebugConsoleConfigSchema.optional(),
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
}).strict();

/** Identifiers of every device in a config, with where each one sits (for duplicate checks). */
export function deviceIds(c: z.infer<typeof VmConfigObject>): { id: string; where: string }[] {
  const out: { id: string; where: string }[] = [];
  const add = (list: { id?: string }[] | undefined, where: string) =>
    list?.forEach((d, i) => d.id !== undefined && out.push({ id: d.id, where: `${where}[${i}]` }));
  add(c.disks, "disks");
  add(c.net, "net");
  add(c.fs, "fs");
  add(c.pmem, "pmem");
  add(c.devices, "devices");
  add(c.user_devices, "user_devices");
  add(c.vdpa, "vdpa");
  add(c.generic_vhost_user, "generic_vhost_user");
  add(c.vsock ? [c.vsock] : undefined, "vsock");
  add([c.rng], "rng");
  add(c.balloon ? [c.balloon] : undefined, "balloon");
  add([c.console], "console");
  add(c.memory.zones, "memory.zones");
  return out;
}

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
  const shared = c.memory.shared || (c.memory.zones?.some((z) => z.shared) ?? false);
  if (!shared) {
    if (c.fs && c.fs.length > 0) needShared("fs");
    if (c.disks?.some((d) => d.vhost_user)) needShared("disks");
    if (c.net?.some((n) => n.vhost_user)) needShared("net");
    if (c.generic_vhost_user && c.generic_vhost_user.length > 0) needShared("generic_vhost_user");
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
  const checkSeg = (list: { pci_segment?: number }[] | undefined, where: string) =>
    list?.forEach((d, i) => {
      if (d.pci_segment !== undefined && d.pci_segment >= segments) {
        issue(
          [where, i, "pci_segment"],
          `PCI segment ${d.pci_segment} does not exist (num_pci_segments=${segments})`,
        );
      }
    });
  checkSeg(c.disks, "disks");
  checkSeg(c.net, "net");
  checkSeg(c.fs, "fs");
  checkSeg(c.pmem, "pmem");
  checkSeg(c.devices, "devices");
  checkSeg(c.vdpa, "vdpa");
  if (c.balloon && c.balloon.size > c.memory.size) {
    issue(["balloon", "size"], "the balloon cannot be larger than guest memory");
  }
}

export const VmConfigSchema = VmConfigObject.superRefine(checkVmConfig);

// ---------------------------------------------------------------------------------------------------
// Request bodies of the VM actions

export const VmResizeSchema = z.object({
  desired_vcpus: int().min(1).max(255).optional(),
  desired_ram: memSize().optional(),
  desired_balloon: u64().optional(),
}).strict().refine(
  (r) => r.desired_vcpus !== undefined || r.desired_ram !== undefined || r.desired_balloon !== undefined,
  "at least one of desired_vcpus, desired_ram or desired_balloon is required",
);

export const VmResizeZoneSchema = z.object({ id: nonEmpty("id"), desired_ram: memSize() }).strict();
export const VmResizeDiskSchema = z.object({ id: nonEmpty("id"), desired_size: u64() }).strict();
export const VmRemoveDeviceSchema = z.object({ id: nonEmpty("id") }).strict();
export const VmSnapshotConfigSchema = z.object({ destination_url: nonEmpty("destination_url") }).strict();
export const VmCoredumpDataSchema = z.object({ destination_url: nonEmpty("destination_url") }).strict();

export const VmMemoryZoneUpdateDataSchema = z.object({ id: nonEmpty("id"), host_numa_node: u32() }).strict();

export const RestoreConfigSchema = z.object({
  source_url: nonEmpty("source_url"),
  prefault: z.boolean().optional(),
  memory_restore_mode: z.enum(["Copy", "OnDemand"]).default("Copy"),
  resume: z.boolean().optional(),
  zone_updates: z.array(VmMemoryZoneUpdateDataSchema).optional(),
}).strict();

const MigrationModeSchema = z.enum(["Precopy", "Postcopy"]).default("Precopy");

export const ReceiveMigrationDataSchema = z.object({
  receiver_url: nonEmpty("receiver_url"),
  tls_dir: z.string().optional(),
  memory_mode: MigrationModeSchema,
  zone_updates: z.array(VmMemoryZoneUpdateDataSchema).optional(),
}).strict();

export const SendMigrationDataSchema = z.object({
  destination_url: nonEmpty("destination_url"),
  local: z.boolean().optional(),
  downtime_ms: int().min(1).default(300),
  timeout_s: int().min(1).default(3600),
  timeout_strategy: z.enum(["Cancel", "Ignore"]).default("Cancel"),
  connections: int().min(1).max(128).default(1),
  tls_dir: z.string().optional(),
  memory_mode: MigrationModeSchema,
}).strict();

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
