/**
 * dvmm: a virtual machine monitor with Cloud Hypervisor's command line and REST API.
 *
 *   dvmm --kernel vmlinux --cmdline "console=ttyS0" --serial tty --console off [--api-socket path=S]
 *   dvmm --api-socket path=/tmp/dvmm.sock        (API only; create and boot the VM over REST)
 *   dvmm remote --api-socket /tmp/dvmm.sock info
 *
 * The command line is Cloud Hypervisor's: the same options, value syntax, defaults and arity (repeatable
 * options take one or more values per occurrence; single-value options and flags may be given once).
 * VM options are turned into the same control-loop requests (vm.create, vm.boot) the API sends.
 */
import { runRemote } from "./api/remote.ts";
import { type ApiServer, parseApiSocketOption, startApiServer } from "./api/server.ts";
import { DVMM_VERSION } from "./vmm/version.ts";
import type { RestoreConfig, VmConfig } from "./vmm/vm_config.ts";
import { type CliVmOptions, ConfigError, parseRestoreConfig, vmConfigFromCli } from "./vmm/config.ts";
import { ControlLoop, type VmBackend } from "./vmm/control.ts";
import { EventHub, EventMonitor } from "./vmm/events.ts";
import type { DbusService } from "./api/dbus.ts";
import { logger, setLogFile, setVerbosity } from "./vmm/log.ts";
import { type SeccompMode, startSeccomp } from "./vmm/seccomp.ts";

// ---------------------------------------------------------------------------------------------------
// The option table (Cloud Hypervisor's, in its --help order)

/** flag: no value, once; count: no value, repeatable (-v); one: one value, once; many: one or more values
 * per occurrence, repeatable; optional: zero or one value, once (--rtc). */
type Arity = "flag" | "count" | "one" | "many" | "optional";
/** vm options need a payload option (as Cloud Hypervisor's clap groups). */
type Group = "vm" | "payload" | "vmm" | "logging" | "other";

interface OptionSpec {
  arity: Arity;
  group: Group;
  short?: string;
  /** No long spelling (-v). */
  shortOnly?: boolean;
  /** The Cloud Hypervisor build feature it needs, which its release binaries (and dvmm) do not have. */
  notBuilt?: string;
  choices?: readonly string[];
}

export const CLI_OPTIONS: Readonly<Record<string, OptionSpec>> = {
  "api-socket": { arity: "one", group: "vmm" },
  "balloon": { arity: "one", group: "vm" },
  "cmdline": { arity: "one", group: "vm" },
  "console": { arity: "one", group: "vm" },
  "cpus": { arity: "one", group: "vm" },
  "dbus-object-path": { arity: "one", group: "vmm" },
  "dbus-service-name": { arity: "one", group: "vmm" },
  "dbus-system-bus": { arity: "flag", group: "vmm" },
  "debug-console": { arity: "one", group: "vm" },
  "device": { arity: "many", group: "vm" },
  "disk": { arity: "many", group: "vm" },
  "event-monitor": { arity: "one", group: "vmm" },
  "firmware": { arity: "one", group: "payload" },
  "fs": { arity: "many", group: "vm" },
  "fw-cfg-config": { arity: "one", group: "payload", notBuilt: "fw_cfg" },
  "gdb": { arity: "one", group: "vmm", notBuilt: "guest_debug" },
  "generic-vhost-user": { arity: "many", group: "vm" },
  "help": { arity: "flag", group: "other", short: "h" },
  "host-data": { arity: "one", group: "vm", notBuilt: "sev_snp" },
  "igvm": { arity: "one", group: "payload", notBuilt: "igvm" },
  "initramfs": { arity: "one", group: "vm" },
  "ivshmem": { arity: "one", group: "vm", notBuilt: "ivshmem" },
  "kernel": { arity: "one", group: "payload" },
  "landlock": { arity: "flag", group: "vm" },
  "landlock-rules": { arity: "many", group: "vm" },
  "log-file": { arity: "one", group: "logging" },
  "log-format": { arity: "one", group: "logging" },
  "memory": { arity: "one", group: "vm" },
  "memory-zone": { arity: "many", group: "vm" },
  "net": { arity: "many", group: "vm" },
  "no-shutdown": { arity: "flag", group: "vmm" },
  "numa": { arity: "many", group: "vm" },
  "pci-segment": { arity: "many", group: "vm" },
  "platform": { arity: "one", group: "vm" },
  "pmem": { arity: "many", group: "vm" },
  "pvmemcontrol": { arity: "flag", group: "vm", notBuilt: "pvmemcontrol" },
  "pvpanic": { arity: "flag", group: "vm" },
  "rate-limit-group": { arity: "many", group: "vm" },
  "restore": { arity: "one", group: "vmm" },
  "rng": { arity: "one", group: "vm" },
  "rtc": { arity: "optional", group: "vm" },
  "seccomp": { arity: "one", group: "other", choices: ["true", "false", "log", "errno"] },
  "serial": { arity: "one", group: "vm" },
  "tpm": { arity: "one", group: "vm" },
  "user-device": { arity: "many", group: "vm" },
  "v": { arity: "count", group: "logging", short: "v", shortOnly: true },
  "vdpa": { arity: "many", group: "vm" },
  "version": { arity: "flag", group: "other", short: "V" },
  "vsock": { arity: "one", group: "vm" },
  "watchdog": { arity: "flag", group: "vm" },
};

/** Cloud Hypervisor's default log line format (the only one dvmm's logger writes). */
export const DEFAULT_LOG_FORMAT = "cloud-hypervisor: {boottime}s: <{thread}> {level}:{location} -- {msg}";

const USAGE = `dvmm ${DVMM_VERSION}: a KVM virtual machine monitor compatible with Cloud Hypervisor

usage: dvmm [options]
       dvmm remote --api-socket PATH <command> [args]   (see dvmm remote --help)
       dvmm vhost-user-net --net-backend "ip=A,mask=M,socket=PATH[,num_queues=2N,...]"

Options take Cloud Hypervisor's values: "key=value,key=value" strings, toggles on|off, sizes with a
K, M or G suffix, lists [a,b,c-d], pairs [k@v,...]. Options marked (+) are repeatable and take one or
more values per occurrence (--disk path=a path=b --disk path=c). The VM options need --kernel or
--firmware; with one, dvmm creates and boots the VM.

Payload:
  --kernel PATH                 kernel image (ELF vmlinux with a PVH note, or bzImage)
  --firmware PATH               firmware image
  --initramfs PATH              initramfs image
  --cmdline STRING              kernel command line

VM:
  --cpus boot=N,max=N,topology=T:C:D:P,kvm_hyperv=on|off,max_phys_bits=N,affinity=[V@[CPUS],...],
         features=amx,nested=on|off,core_scheduling=vm|vcpu|off,profile=Host
                                (default boot=1,max_phys_bits=46)
  --memory size=SIZE,mergeable=on|off,shared=on|off,hugepages=on|off,hugepage_size=SIZE,
           hotplug_method=acpi|virtio-mem,hotplug_size=SIZE,hotplugged_size=SIZE,prefault=on|off,
           reserve=on|off,thp=on|off                                    (default size=512M)
  --memory-zone id=ID,size=SIZE,file=PATH,shared=on|off,hugepages=on|off,hugepage_size=SIZE,
           host_numa_node=N,hotplug_size=SIZE,hotplugged_size=SIZE,prefault=on|off,reserve=on|off,
           mergeable=on|off                                                                  (+)
  --disk path=FILE,readonly=on|off,direct=on|off,iommu=on|off,num_queues=N,queue_size=N,
         vhost_user=on|off,socket=PATH,bw_size=B,bw_one_time_burst=B,bw_refill_time=MS,ops_size=N,
         ops_one_time_burst=N,ops_refill_time=MS,rate_limit_group=ID,queue_affinity=[Q@[CPUS],...],
         serial=S,backing_files=on|off,sparse=on|off,image_type=raw|qcow2|vhd|vhdx|vmdk,
         lock_granularity=byte-range|full,id=ID,pci_segment=N,pci_device_id=N                (+)
  --net tap=NAME,ip=IP,mask=MASK,mac=MAC,host_mac=MAC,mtu=N,fd=[N,...],iommu=on|off,num_queues=N,
        queue_size=N,vhost_user=on|off,socket=PATH,vhost_mode=client|server,bw_*/ops_* (as --disk),
        offload_tso=on|off,offload_ufo=on|off,offload_csum=on|off,id=ID,pci_segment=N,pci_device_id=N (+)
  --rng src=PATH,iommu=on|off,...                                  (default src=/dev/urandom)
  --rtc [iommu=on|off,id=ID,pci_segment=N,pci_device_id=N]          virtio-rtc (bare --rtc: defaults)
  --balloon size=SIZE,deflate_on_oom=on|off,free_page_reporting=on|off,iommu=on|off,id=ID,...
  --fs tag=TAG,socket=PATH,num_queues=N,queue_size=N,id=ID,pci_segment=N,pci_device_id=N     (+)
  --pmem file=PATH,size=SIZE,discard_writes=on|off,iommu=on|off,id=ID,...                   (+)
  --generic-vhost-user socket=PATH,queue_sizes=[N,...],device_type=NAME|ID,id=ID,...         (+)
  --vsock cid=N,socket=PATH,iommu=on|off,id=ID,pci_segment=N,pci_device_id=N
  --vdpa path=PATH,num_queues=N,iommu=on|off,id=ID,...                                       (+)
  --device path=SYSFS|fd=N,iommu=on|off,id=ID,x_nv_gpudirect_clique=N,x_exclude_mmap_bars=[N,...] (+)
  --user-device socket=PATH,id=ID,pci_segment=N,pci_device_id=N                               (+)
  --serial off|null|pty|tty|file=PATH|socket=PATH                               (default null)
  --console off|null|pty|tty|file=PATH[,iommu=on|off,id=ID,...]                 (default tty)
  --debug-console off|null|pty|tty|file=PATH[,iobase=0xN]              (default off,iobase=0xe9)
  --numa guest_numa_id=N,cpus=[..],distances=[DEST@DIST,...],memory_zones=[ID,...],
         pci_segments=[..],device_id=ID                                                      (+)
  --platform num_pci_segments=N,iommu_segments=[..],iommu_address_width=BITS,iommufd=on|off,
             iommufd_fd=N,vfio_p2p_dma=on|off,system_manufacturer=S,system_product_name=S,
             system_version=S,system_serial_number=S,system_uuid=S,system_sku_number=S,
             system_family=S,chassis_asset_tag=S,oem_strings=[S,...]
  --pci-segment pci_segment=N,mmio32_aperture_weight=N,mmio64_aperture_weight=N              (+)
  --rate-limit-group id=ID,bw_size=B,bw_one_time_burst=B,bw_refill_time=MS,ops_size=N,
                     ops_one_time_burst=N,ops_refill_time=MS                                 (+)
  --tpm socket=PATH             a TPM backed by swtpm
  --pvpanic                     the pvpanic device
  --watchdog                    the virtio watchdog
  --landlock                    sandbox the VMM with Landlock
  --landlock-rules path=PATH,access=r|w|rw                                                   (+)

VMM:
  --api-socket path=PATH|fd=N   serve the REST API on this UNIX socket (a bare PATH works too)
  --event-monitor path=FILE|fd=N  write life-cycle events there, one JSON object per line
  --dbus-service-name NAME --dbus-object-path PATH [--dbus-system-bus]   serve the D-Bus API
  --restore source_url=URL,prefault=on|off,memory_restore_mode=copy|ondemand,resume=on|off,...
  --no-shutdown                 keep the VMM running when the guest shuts down
  --seccomp true|false|log|errno  seccomp filter action (default true)
  -v                            more log output (repeat for more)
  --log-file PATH               log to PATH instead of stderr
  --log-format FORMAT           log line format (dvmm writes only the default one)
  -V, --version                 print the version
  -h, --help                    print this help

Cloud Hypervisor build features that dvmm does not have: --igvm, --host-data, --fw-cfg-config,
--gdb, --ivshmem, --pvmemcontrol (they are refused).`;

// ---------------------------------------------------------------------------------------------------
// argv

/** A command-line error; `code` is the exit status (2 for usage errors, as clap). */
export class CliError extends Error {
  constructor(message: string, readonly code = 2) {
    super(message);
    this.name = "CliError";
  }
}

/** The parsed command line. */
export interface ParsedCli {
  help: boolean;
  version: boolean;
  verbosity: number;
  /** The VM options given (no defaults filled in); `null` without --kernel/--firmware. */
  vm: CliVmOptions | null;
  apiSocket?: string;
  eventMonitor?: string;
  logFile?: string;
  logFormat?: string;
  /** As given; undefined means Cloud Hypervisor's default (true). */
  seccomp?: string;
  restore?: string;
  noShutdown: boolean;
  dbusServiceName?: string;
  dbusObjectPath?: string;
  dbusSystemBus: boolean;
}

const BY_SHORT = new Map(
  Object.entries(CLI_OPTIONS).filter(([, s]) => s.short).map(([name, s]) => [s.short!, name]),
);

/** A token clap would take for an option rather than a value. */
const looksLikeOption = (t: string) => t.startsWith("-") && t !== "-";

function display(name: string): string {
  return CLI_OPTIONS[name]?.shortOnly ? `-${CLI_OPTIONS[name].short}` : `--${name}`;
}

/** Read argv as Cloud Hypervisor's clap definition does. */
export function parseCli(argv: readonly string[]): ParsedCli {
  const values = new Map<string, string | string[] | boolean | number>();
  const order: string[] = [];
  const seenOnce = (name: string) => {
    if (values.has(name)) throw new CliError(`the argument '${display(name)}' cannot be used multiple times`);
  };
  const refuseNotBuilt = (name: string) => {
    const f = CLI_OPTIONS[name].notBuilt;
    if (f) {
      throw new CliError(
        `--${name}: not built in dvmm (it needs Cloud Hypervisor's '${f}' build feature, which its release ` +
          `binaries do not have either)`,
        1,
      );
    }
  };
  const setFlag = (name: string) => {
    const spec = CLI_OPTIONS[name];
    if (spec.arity === "count") {
      values.set(name, ((values.get(name) as number | undefined) ?? 0) + 1);
    } else {
      seenOnce(name);
      values.set(name, true);
    }
    order.push(name);
  };

  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a.startsWith("--") && a.length > 2) {
      const eq = a.indexOf("=");
      const name = eq < 0 ? a.slice(2) : a.slice(2, eq);
      const attached = eq < 0 ? undefined : a.slice(eq + 1);
      const spec = Object.hasOwn(CLI_OPTIONS, name) ? CLI_OPTIONS[name] : undefined;
      if (!spec || spec.shortOnly) throw new CliError(`unexpected argument '--${name}' found`);
      if (name === "help") return helpOnly();
      switch (spec.arity) {
        case "flag":
        case "count":
          if (attached !== undefined) {
            throw new CliError(`unexpected value '${attached}' for '--${name}' found; no more were expected`);
          }
          setFlag(name);
          break;
        case "one":
        case "optional": {
          seenOnce(name);
          let value = attached;
          if (value === undefined && i + 1 < argv.length && !looksLikeOption(argv[i + 1])) value = argv[++i];
          if (value === undefined) {
            if (spec.arity === "optional") value = "";
            else {
              throw new CliError(
                `a value is required for '--${name} <${name}>' but none was supplied` +
                  (i + 1 < argv.length
                    ? ` (to pass '${argv[i + 1]}' as its value, write --${name}=${argv[i + 1]})`
                    : ""),
              );
            }
          }
          if (spec.choices && !spec.choices.includes(value)) {
            throw new CliError(
              `invalid value '${value}' for '--${name} <${name}>' [possible values: ${
                spec.choices.join(", ")
              }]`,
            );
          }
          values.set(name, value);
          order.push(name);
          break;
        }
        case "many": {
          const list = (values.get(name) as string[] | undefined) ?? [];
          if (attached !== undefined) list.push(attached);
          else {
            const before = list.length;
            while (i + 1 < argv.length && !looksLikeOption(argv[i + 1])) list.push(argv[++i]);
            if (list.length === before) {
              throw new CliError(`a value is required for '--${name} <${name}>...' but none was supplied`);
            }
          }
          values.set(name, list);
          order.push(name);
          break;
        }
      }
      refuseNotBuilt(name);
    } else if (a.startsWith("-") && a.length > 1 && !a.startsWith("--")) {
      for (const ch of a.slice(1)) {
        const name = BY_SHORT.get(ch);
        if (!name) throw new CliError(`unexpected argument '-${ch}' found`);
        if (name === "help") return helpOnly();
        setFlag(name);
      }
    } else {
      throw new CliError(`unexpected argument '${a}' found`);
    }
  }

  // Every VM option needs a payload (Cloud Hypervisor's vm-config group requires vm-payload).
  const payload = order.some((n) => CLI_OPTIONS[n].group === "payload");
  const firstVm = order.find((n) => CLI_OPTIONS[n].group === "vm");
  if (firstVm && !payload) {
    throw new CliError(
      `${display(firstVm)} needs a payload: --kernel (or --firmware) is required to describe a VM`,
    );
  }

  const str = (n: string) => values.get(n) as string | undefined;
  const flag = (n: string) => values.get(n) === true;
  let vm: CliVmOptions | null = null;
  if (payload) {
    vm = {};
    for (const n of order) {
      if (CLI_OPTIONS[n].group === "vm" || CLI_OPTIONS[n].group === "payload") {
        (vm as Record<string, unknown>)[n] = values.get(n);
      }
    }
  }
  return {
    help: false,
    version: flag("version"),
    verbosity: (values.get("v") as number | undefined) ?? 0,
    vm,
    apiSocket: str("api-socket"),
    eventMonitor: str("event-monitor"),
    logFile: str("log-file"),
    logFormat: str("log-format"),
    seccomp: str("seccomp"),
    restore: str("restore"),
    noShutdown: flag("no-shutdown"),
    dbusServiceName: str("dbus-service-name"),
    dbusObjectPath: str("dbus-object-path"),
    dbusSystemBus: flag("dbus-system-bus"),
  };
}

function helpOnly(): ParsedCli {
  return { help: true, version: false, verbosity: 0, vm: null, noShutdown: false, dbusSystemBus: false };
}

const LOG_TOKENS = new Set([
  "boottime",
  "wallclock",
  "glog",
  "localglog",
  "pid",
  "tid",
  "thread",
  "level",
  "levelchar",
  "location",
  "msg",
  ...["year", "month", "day", "hour", "minute", "second", "micros", "offset"].flatMap((
    t,
  ) => [t, `local${t}`]),
]);

/** Why a `--log-format` value cannot be used, or null when it is CH's default (the one dvmm writes). */
export function logFormatProblem(format: string): string | null {
  for (let i = 0; i < format.length; i++) {
    const c = format[i];
    if (c === "{") {
      if (format[i + 1] === "{") {
        i++;
        continue;
      }
      const end = format.indexOf("}", i + 1);
      if (end < 0) return "unterminated '{' in the format string";
      const token = format.slice(i + 1, end);
      if (!LOG_TOKENS.has(token)) return `unknown format token '{${token}}'`;
      i = end;
    } else if (c === "}") {
      if (format[i + 1] !== "}") return "unmatched '}' in the format string";
      i++;
    }
  }
  if (format === DEFAULT_LOG_FORMAT) return null;
  return `dvmm cannot change its log line format yet; only the default ('${DEFAULT_LOG_FORMAT}') is accepted`;
}

// ---------------------------------------------------------------------------------------------------

function fail(message: string, code = 1): never {
  console.error(`dvmm: ${message}`);
  console.error("Try 'dvmm --help' for more information.");
  Deno.exit(code);
}

/** Put the terminal in raw mode and pass stdin to the guest while serial or console uses the terminal. */
function wireTerminal(config: VmConfig | null, current: () => VmBackend | null): () => void {
  if (!config || (config.serial.mode !== "Tty" && config.console.mode !== "Tty")) return () => {};
  let raw = false;
  if (Deno.stdin.isTerminal()) {
    try {
      Deno.stdin.setRaw(true);
      raw = true;
    } catch (e) {
      logger("main").warn(`cannot put the terminal in raw mode: ${(e as Error).message}`);
    }
  }
  (async () => {
    try {
      for await (const chunk of Deno.stdin.readable) current()?.serialInput?.(chunk);
    } catch {
      // stdin closed
    }
  })();
  return () => {
    if (raw) {
      try {
        Deno.stdin.setRaw(false);
      } catch { /* not a terminal any more */ }
    }
  };
}

/**
 * `dvmm vhost-user-net --net-backend "..."`: the vhost-user-net back-end (Cloud Hypervisor's
 * `vhost_user_net`), serving front-ends on a socket until killed.
 */
async function vhostUserNet(args: string[]): Promise<number> {
  const { NET_BACKEND_USAGE, parseNetBackend, runNetBackend } = await import(
    "./devices/virtio/vhost_user_net_backend.ts"
  );
  let value: string | undefined;
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === "--help" || a === "-h") {
      console.log(`usage: ${NET_BACKEND_USAGE}`);
      return 0;
    }
    if (a === "--net-backend" && i + 1 < args.length) value = args[++i];
    else if (a.startsWith("--net-backend=")) value = a.slice("--net-backend=".length);
    else {
      console.error(`dvmm vhost-user-net: unexpected argument '${a}'\nusage: ${NET_BACKEND_USAGE}`);
      return 2;
    }
  }
  if (value === undefined) {
    console.error(`dvmm vhost-user-net: --net-backend is required\nusage: ${NET_BACKEND_USAGE}`);
    return 2;
  }
  try {
    runNetBackend(parseNetBackend(value));
    return 0;
  } catch (e) {
    console.error(`dvmm vhost-user-net: ${(e as Error).message}`);
    return 1;
  }
}

async function main(argv: string[]): Promise<number> {
  if (argv[0] === "remote") return await runRemote(argv.slice(1));
  if (argv[0] === "vhost-user-net") return await vhostUserNet(argv.slice(1));
  if (argv.length === 0) {
    // As Cloud Hypervisor (arg_required_else_help): no arguments at all prints the help.
    console.error(USAGE);
    return 2;
  }

  let cli: ParsedCli;
  try {
    cli = parseCli(argv);
  } catch (e) {
    if (e instanceof CliError) fail(e.message, e.code);
    throw e;
  }
  if (cli.help) {
    console.log(USAGE);
    return 0;
  }
  if (cli.version) {
    console.log(`dvmm v${DVMM_VERSION}`);
    return 0;
  }
  setVerbosity(cli.verbosity);
  if (cli.logFile !== undefined) {
    try {
      // Cloud Hypervisor creates the file afresh.
      Deno.openSync(cli.logFile, { write: true, create: true, truncate: true }).close();
      setLogFile(cli.logFile);
    } catch (e) {
      fail(`--log-file: cannot open ${cli.logFile}: ${(e as Error).message}`);
    }
  }
  if (cli.logFormat !== undefined) {
    const problem = logFormatProblem(cli.logFormat);
    if (problem) fail(`--log-format: ${problem}`);
  }
  const log = logger("main");

  let config: VmConfig | null = null;
  if (cli.vm) {
    try {
      config = vmConfigFromCli(cli.vm);
    } catch (e) {
      if (e instanceof ConfigError) fail(e.message);
      throw e;
    }
  }
  let restore: RestoreConfig | null = null;
  if (cli.restore !== undefined) {
    if (config) {
      log.warn(
        "--restore is ignored: a payload (--kernel/--firmware) was given, so the VM is booted instead",
      );
    } else {
      try {
        restore = parseRestoreConfig(cli.restore, "--restore");
      } catch (e) {
        if (e instanceof ConfigError) fail(e.message);
        throw e;
      }
    }
  }
  let apiSpec = null;
  if (cli.apiSocket !== undefined) {
    try {
      apiSpec = parseApiSocketOption(cli.apiSocket);
    } catch (e) {
      fail((e as Error).message);
    }
  }
  if (cli.dbusServiceName !== undefined && cli.dbusObjectPath === undefined) {
    fail("--dbus-service-name needs --dbus-object-path too");
  }
  if (cli.dbusObjectPath !== undefined && cli.dbusServiceName === undefined) {
    fail("--dbus-object-path needs --dbus-service-name too");
  }
  const dbusWanted = cli.dbusServiceName !== undefined;
  if (!config && !apiSpec && !restore && !dbusWanted) {
    fail("nothing to do: give a VM (--kernel ...), --restore, and/or --api-socket path=PATH");
  }

  // Every event goes, formatted once, to the event monitor and to the D-Bus `Event` signal.
  const events = new EventHub();
  let monitor: EventMonitor | null = null;
  if (cli.eventMonitor !== undefined) {
    try {
      monitor = EventMonitor.open(cli.eventMonitor);
    } catch (e) {
      fail((e as Error).message);
    }
    events.attach((json) => monitor!.write(json));
  }
  events.emit("vmm", "starting");

  // The VM backend (KVM, devices) is loaded here rather than statically so the API, `remote` and the
  // option checks keep working when it cannot load (no shim built, no /dev/kvm); boot then says why.
  let createBackend: (cfg: VmConfig) => VmBackend;
  let prewarm: ((cfg: VmConfig) => void) | undefined;
  let drainPrewarmed: (() => void) | undefined;
  try {
    const backendModule = await import("./vmm/vm.ts");
    createBackend = backendModule.createVmBackend;
    prewarm = backendModule.prewarmVm;
    drainPrewarmed = () => backendModule.workerPool.drain();
  } catch (e) {
    const why = (e as Error).message.split("\n")[0];
    log.warn(`VM backend not available: ${why}`);
    createBackend = () => {
      throw new Error(`VM backend not available: ${why}`);
    };
  }
  // Seccomp (Cloud Hypervisor's default: on), before any worker thread starts so that all inherit it.
  try {
    startSeccomp((cli.seccomp ?? "true") as SeccompMode);
  } catch (e) {
    fail(`--seccomp: ${(e as Error).message}`);
  }

  let backend: VmBackend | null = null;
  const loop = new ControlLoop({
    factory: (cfg) => (backend = createBackend(cfg)),
    events,
    noShutdown: cli.noShutdown,
    prewarm,
    drainPrewarmed,
  });

  for (const sig of ["SIGINT", "SIGTERM"] as const) {
    Deno.addSignalListener(sig, () => {
      log.info(`${sig}: shutting down`);
      loop.submit({ kind: "vmm.shutdown", body: undefined, reply: () => {} });
    });
  }

  let server: ApiServer | null = null;
  if (apiSpec) {
    try {
      server = await startApiServer(apiSpec, loop);
    } catch (e) {
      fail((e as Error).message);
    }
  }

  // The D-Bus API: its module (and the D-Bus library) is loaded only when asked for.
  let dbus: DbusService | null = null;
  if (dbusWanted) {
    const { startDbusService } = await import("./api/dbus.ts");
    try {
      dbus = await startDbusService({
        serviceName: cli.dbusServiceName!,
        objectPath: cli.dbusObjectPath!,
        systemBus: cli.dbusSystemBus,
      }, loop);
      const service = dbus;
      events.attach((json) => service.emitEvent(json));
    } catch (e) {
      await server?.close();
      fail((e as Error).message);
    }
  }

  let restoreTerminal = wireTerminal(config, () => backend);
  // A VM created through the API (or restored, or received) may put its serial port or console on this
  // terminal too: wired once, when the first such VM comes up.
  let wired = config !== null;
  events.attach((json) => {
    if (wired || !/"event":"(booted|restored|migration-receive-finished)"/.test(json)) return;
    wired = true;
    loop.request("vm.info").then((info) => {
      if (info.ok) restoreTerminal = wireTerminal((info.body as { config: VmConfig }).config, () => backend);
    });
  });
  const cleanup = async () => {
    restoreTerminal();
    await server?.close();
    await dbus?.close();
    monitor?.close();
  };

  if (config) {
    for (const kind of ["vm.create", "vm.boot"] as const) {
      const r = kind === "vm.create" ? await loop.request(kind, config) : await loop.request(kind);
      if (!r.ok) {
        console.error(
          `dvmm: ${kind === "vm.create" ? "cannot create the VM" : "cannot boot the VM"}: ${
            r.error.messages.join(": ")
          }`,
        );
        await loop.request("vm.delete");
        await cleanup();
        return 1;
      }
    }
  } else if (restore) {
    const r = await loop.request("vm.restore", restore);
    if (!r.ok) {
      console.error(`dvmm: cannot restore the VM: ${r.error.messages.join(": ")}`);
      await loop.request("vmm.shutdown");
      await cleanup();
      return 1;
    }
  }

  const code = await loop.exited;
  await cleanup();
  return code;
}

if (import.meta.main) {
  const code = await main(Deno.args);
  Deno.exit(code);
}
