/**
 * dvmm: a virtual machine monitor with Cloud Hypervisor's command line and REST API.
 *
 *   dvmm --kernel vmlinux --cmdline "console=ttyS0" --serial tty --console off [--api-socket path=S]
 *   dvmm --api-socket path=/tmp/dvmm.sock        (API only; create and boot the VM over REST)
 *   dvmm remote --api-socket /tmp/dvmm.sock info
 *
 * VM options are turned into the same control-loop requests (vm.create, vm.boot) the API sends.
 */
import { parseArgs } from "node:util";
import { runRemote } from "./api/remote.ts";
import { type ApiServer, parseApiSocketOption, startApiServer } from "./api/server.ts";
import { DVMM_VERSION } from "./vmm/version.ts";
import type { VmConfig } from "./vmm/vm_config.ts";
import { type CliVmOptions, ConfigError, vmConfigFromCli } from "./vmm/config.ts";
import { ControlLoop, type VmBackend } from "./vmm/control.ts";
import { EventMonitor, type EventSink, nullEventSink } from "./vmm/events.ts";
import { logger, setLogFile, setVerbosity } from "./vmm/log.ts";

const USAGE = `dvmm ${DVMM_VERSION}: a KVM virtual machine monitor compatible with Cloud Hypervisor

usage: dvmm [options]
       dvmm remote --api-socket PATH <command> [args]   (see dvmm remote --help)

VM options (a VM is created and booted when --kernel or --firmware is given):
  --kernel PATH                 kernel image (ELF vmlinux or bzImage)
  --firmware PATH               firmware image
  --initramfs PATH              initramfs image
  --cmdline STRING              kernel command line
  --cpus boot=N[,max=M][,topology=T:C:D:P][,kvm_hyperv=on][,max_phys_bits=B][,nested=on|off]
  --memory size=SIZE[,shared=on][,hugepages=on][,hugepage_size=SIZE][,hotplug_size=SIZE][,prefault=on]
  --serial off|null|pty|tty|file=PATH|socket=PATH      (default null)
  --console off|null|pty|tty|file=PATH                 (default tty)
  --disk path=FILE[,readonly=on][,direct=on][,id=ID][,num_queues=N][,queue_size=N][,serial=S]  (repeatable)
  --net tap=NAME[,ip=A][,mask=M][,mac=MAC][,num_queues=N][,queue_size=N][,fd=N][,id=ID]           (repeatable)
  --rng src=PATH                (default src=/dev/urandom)
  --fs tag=T,socket=S[,...]  --pmem file=F[,...]  --vsock cid=N,socket=S  --device path=P  (repeatable)
  --user-device socket=S  --vdpa path=P[,num_queues=N]                                     (repeatable)

VMM options:
  --api-socket path=PATH|fd=N   serve the REST API on this UNIX socket
  --event-monitor path=FILE|fd=N  write life-cycle events there, one JSON object per line
  -v                            more log output (repeat for more)
  --log-file PATH               log to PATH instead of stderr
  -V, --version                 print the version
  -h, --help                    print this help`;

const REPEATABLE = ["disk", "net", "fs", "pmem", "device", "user-device", "vdpa"] as const;
const SINGLE = [
  "kernel",
  "firmware",
  "initramfs",
  "cmdline",
  "cpus",
  "memory",
  "serial",
  "console",
  "rng",
  "vsock",
] as const;

function fail(message: string): never {
  console.error(`dvmm: ${message}`);
  console.error("Try 'dvmm --help' for more information.");
  Deno.exit(1);
}

function parseCli(argv: string[]) {
  const options: Record<string, { type: "string" | "boolean"; multiple?: boolean; short?: string }> = {
    "api-socket": { type: "string" },
    "event-monitor": { type: "string" },
    "log-file": { type: "string" },
    "verbose": { type: "boolean", short: "v", multiple: true },
    "version": { type: "boolean", short: "V" },
    "help": { type: "boolean", short: "h" },
  };
  for (const o of SINGLE) options[o] = { type: "string" };
  for (const o of REPEATABLE) options[o] = { type: "string", multiple: true };
  try {
    const { values, positionals } = parseArgs({ args: argv, options, strict: true, allowPositionals: true });
    if (positionals.length > 0) fail(`unexpected argument '${positionals[0]}'`);
    return values as Record<string, string | string[] | boolean | boolean[] | undefined>;
  } catch (e) {
    fail((e as Error).message);
  }
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

async function main(argv: string[]): Promise<number> {
  if (argv[0] === "remote") return await runRemote(argv.slice(1));

  const v = parseCli(argv);
  if (v.help) {
    console.log(USAGE);
    return 0;
  }
  if (v.version) {
    console.log(`dvmm v${DVMM_VERSION}`);
    return 0;
  }
  setVerbosity((v.verbose as boolean[] | undefined)?.length ?? 0);
  if (v["log-file"]) {
    try {
      setLogFile(v["log-file"] as string);
    } catch (e) {
      fail(`--log-file: cannot open ${v["log-file"]}: ${(e as Error).message}`);
    }
  }
  const log = logger("main");

  const vmOptions: CliVmOptions = {};
  let anyVmOption = false;
  for (const o of [...SINGLE, ...REPEATABLE]) {
    if (v[o] !== undefined) {
      (vmOptions as Record<string, unknown>)[o] = v[o];
      anyVmOption = true;
    }
  }
  let config: VmConfig | null = null;
  if (anyVmOption) {
    try {
      config = vmConfigFromCli(vmOptions);
    } catch (e) {
      if (e instanceof ConfigError) fail(e.message);
      throw e;
    }
  }
  let apiSpec = null;
  if (v["api-socket"] !== undefined) {
    try {
      apiSpec = parseApiSocketOption(v["api-socket"] as string);
    } catch (e) {
      fail((e as Error).message);
    }
  }
  if (!config && !apiSpec) fail("nothing to do: give a VM (--kernel ...) and/or --api-socket path=PATH");

  let events: EventSink = nullEventSink;
  let monitor: EventMonitor | null = null;
  if (v["event-monitor"] !== undefined) {
    try {
      monitor = EventMonitor.open(v["event-monitor"] as string);
      events = monitor;
    } catch (e) {
      fail((e as Error).message);
    }
  }
  events.emit("vmm", "starting");

  // The VM backend (KVM, devices) is loaded here rather than statically so the API, `remote` and the
  // option checks keep working when it cannot load (no shim built, no /dev/kvm); boot then says why.
  let createBackend: (cfg: VmConfig) => VmBackend;
  try {
    createBackend = (await import("./vmm/vm.ts")).createVmBackend;
  } catch (e) {
    const why = (e as Error).message.split("\n")[0];
    log.warn(`VM backend not available: ${why}`);
    createBackend = () => {
      throw new Error(`VM backend not available: ${why}`);
    };
  }
  let backend: VmBackend | null = null;
  const loop = new ControlLoop({
    factory: (cfg) => (backend = createBackend(cfg)),
    events,
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

  const restoreTerminal = wireTerminal(config, () => backend);
  const cleanup = async () => {
    restoreTerminal();
    await server?.close();
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
  }

  const code = await loop.exited;
  await cleanup();
  return code;
}

if (import.meta.main) {
  const code = await main(Deno.args);
  Deno.exit(code);
}
