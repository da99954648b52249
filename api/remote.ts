/**
 * `dvmm remote --api-socket PATH <command> [args]`: a command-line client for the REST API, with
 * ch-remote's command names. Replies with a body are printed as JSON; on an error the server's messages
 * go to stderr and the exit status is 1.
 */
import { ApiReply, apiRequest, errorMessages } from "./client.ts";
import { API_PREFIX } from "./routes.ts";
import {
  ConfigError,
  parseDeviceConfig,
  parseDiskConfig,
  parseFsConfig,
  parseNetConfig,
  parsePmemConfig,
  parseRestoreConfig,
  parseSize,
  parseUserDeviceConfig,
  parseVdpaConfig,
  parseVsockConfig,
} from "../vmm/config.ts";

export interface RemoteIo {
  out(text: string): void;
  err(text: string): void;
  readStdin(): Promise<string>;
}

const defaultIo: RemoteIo = {
  out: (t) => console.log(t),
  err: (t) => console.error(t),
  readStdin: async () => await new Response(Deno.stdin.readable).text(),
};

export const REMOTE_USAGE = `usage: dvmm remote --api-socket PATH <command> [args]

commands:
  ping                          VMM information
  shutdown-vmm                  shut the VMM down
  create FILE                   create the VM from a JSON VmConfig (FILE or - for stdin)
  boot | delete | shutdown | reboot | power-button | pause | resume | nmi
  info                          VM information (JSON)
  counters                      VM counters (JSON)
  add-disk path=FILE[,...]      add-net tap=...|fd=[N,..][,...]  add-fs tag=T,socket=S[,...]
  add-pmem file=F[,...]         add-vsock cid=N,socket=S add-device path=SYSFS[,...]
  add-user-device socket=S      add-vdpa path=P[,...]
  remove-device ID
  resize [--cpus N] [--memory SIZE] [--balloon SIZE]
  resize-zone --id ID --size SIZE
  resize-disk --disk ID --size SIZE
  snapshot URL                  restore source_url=URL[,prefault=on]
  coredump URL
  send-migration URL [--local]  receive-migration URL`;

class UsageError extends Error {}

interface Call {
  method: "GET" | "PUT";
  endpoint: string;
  body?: unknown;
  /** Descriptors of this process sent with the request (SCM_RIGHTS). */
  fds?: number[];
}

function one(cmd: string, args: string[], what: string): string {
  if (args.length !== 1) throw new UsageError(`${cmd} takes exactly one argument: ${what}`);
  return args[0];
}

function none(cmd: string, args: string[]): void {
  if (args.length !== 0) throw new UsageError(`${cmd} takes no arguments`);
}

/**
 * node:util's parseArgs, loaded by runRemote: a static import of node:util would make every dvmm start
 * load Node's util compatibility layer (several milliseconds of start-up) for a sub-command it rarely runs.
 */
let parseArgs: typeof import("node:util").parseArgs | null = null;

function flags(cmd: string, args: string[], spec: Record<string, "string" | "boolean">) {
  if (!parseArgs) throw new Error("remote: node:util not loaded (runRemote loads it)");
  try {
    const options = Object.fromEntries(Object.entries(spec).map(([k, type]) => [k, { type }]));
    return parseArgs({ args, options, allowPositionals: true, strict: true });
  } catch (e) {
    throw new UsageError(`${cmd}: ${(e as Error).message}`);
  }
}

function sizeFlag(cmd: string, name: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  try {
    return parseSize(v);
  } catch (e) {
    throw new UsageError(`${cmd}: --${name}: ${(e as Error).message}`);
  }
}

async function buildCall(cmd: string, args: string[], io: RemoteIo): Promise<Call> {
  const put = (endpoint: string, body?: unknown): Call => ({ method: "PUT", endpoint, body });
  switch (cmd) {
    case "ping":
      none(cmd, args);
      return { method: "GET", endpoint: "vmm.ping" };
    case "shutdown-vmm":
      none(cmd, args);
      return put("vmm.shutdown");
    case "info":
    case "counters":
      none(cmd, args);
      return { method: "GET", endpoint: `vm.${cmd}` };
    case "boot":
    case "delete":
    case "shutdown":
    case "reboot":
    case "power-button":
    case "pause":
    case "resume":
    case "nmi":
      none(cmd, args);
      return put(`vm.${cmd}`);
    case "create": {
      const file = one(cmd, args, "a VmConfig JSON file, or - for stdin");
      const text = file === "-" ? await io.readStdin() : await Deno.readTextFile(file);
      try {
        JSON.parse(text);
      } catch (e) {
        throw new UsageError(`create: ${file} is not valid JSON: ${(e as Error).message}`);
      }
      return put("vm.create", text);
    }
    case "add-disk":
      return put("vm.add-disk", parseDiskConfig(one(cmd, args, "a disk description")));
    case "add-net": {
      // `fd=[3,4]` names taps this process inherited: they travel with the request (SCM_RIGHTS), as
      // ch-remote sends them, and the server takes them as the device's taps.
      const { fds, ...net } = parseNetConfig(one(cmd, args, "a network device description"));
      return { method: "PUT", endpoint: "vm.add-net", body: net, fds };
    }
    case "add-fs":
      return put("vm.add-fs", parseFsConfig(one(cmd, args, "a virtio-fs description")));
    case "add-pmem":
      return put("vm.add-pmem", parsePmemConfig(one(cmd, args, "a pmem description")));
    case "add-vsock":
      return put("vm.add-vsock", parseVsockConfig(one(cmd, args, "a vsock description")));
    case "add-device":
      return put("vm.add-device", parseDeviceConfig(one(cmd, args, "a VFIO device description")));
    case "add-user-device":
      return put("vm.add-user-device", parseUserDeviceConfig(one(cmd, args, "a user device description")));
    case "add-vdpa":
      return put("vm.add-vdpa", parseVdpaConfig(one(cmd, args, "a vDPA device description")));
    case "remove-device":
      return put("vm.remove-device", { id: one(cmd, args, "a device identifier") });
    case "resize": {
      const { values, positionals } = flags(cmd, args, {
        cpus: "string",
        memory: "string",
        balloon: "string",
      });
      if (positionals.length) throw new UsageError(`resize: unexpected '${positionals.join(" ")}'`);
      const body: Record<string, number> = {};
      if (values.cpus !== undefined) {
        const n = Number(values.cpus);
        if (!Number.isInteger(n) || n < 1) throw new UsageError("resize: --cpus must be a positive integer");
        body.desired_vcpus = n;
      }
      const ram = sizeFlag(cmd, "memory", values.memory as string | undefined);
      if (ram !== undefined) body.desired_ram = ram;
      const balloon = sizeFlag(cmd, "balloon", values.balloon as string | undefined);
      if (balloon !== undefined) body.desired_balloon = balloon;
      if (Object.keys(body).length === 0) throw new UsageError("resize: give --cpus, --memory or --balloon");
      return put("vm.resize", body);
    }
    case "resize-zone": {
      const { values } = flags(cmd, args, { id: "string", size: "string" });
      if (values.id === undefined || values.size === undefined) {
        throw new UsageError("resize-zone: --id and --size are required");
      }
      return put("vm.resize-zone", {
        id: values.id,
        desired_ram: sizeFlag(cmd, "size", values.size as string),
      });
    }
    case "resize-disk": {
      const { values } = flags(cmd, args, { disk: "string", size: "string" });
      if (values.disk === undefined || values.size === undefined) {
        throw new UsageError("resize-disk: --disk and --size are required");
      }
      return put("vm.resize-disk", {
        id: values.disk,
        desired_size: sizeFlag(cmd, "size", values.size as string),
      });
    }
    case "snapshot":
      return put("vm.snapshot", { destination_url: one(cmd, args, "a destination URL (file:///dir)") });
    case "coredump":
      return put("vm.coredump", { destination_url: one(cmd, args, "a destination URL (file:///path)") });
    case "restore":
      return put("vm.restore", parseRestoreConfig(one(cmd, args, "source_url=URL[,prefault=on]")));
    case "send-migration": {
      const { values, positionals } = flags(cmd, args, { local: "boolean" });
      const url = one(cmd, positionals, "a destination URL");
      return put("vm.send-migration", { destination_url: url, ...(values.local ? { local: true } : {}) });
    }
    case "receive-migration":
      return put("vm.receive-migration", { receiver_url: one(cmd, args, "a receiver URL") });
  }
  throw new UsageError(`unknown command '${cmd}'`);
}

/** Run `dvmm remote` with the arguments after `remote`; returns the exit status. */
export async function runRemote(argv: string[], io: RemoteIo = defaultIo): Promise<number> {
  parseArgs ??= (await import("node:util")).parseArgs;
  let socket: string | undefined;
  let i = 0;
  for (; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--api-socket") {
      socket = argv[++i];
    } else if (a.startsWith("--api-socket=")) {
      socket = a.slice("--api-socket=".length);
    } else if (a === "-h" || a === "--help") {
      io.out(REMOTE_USAGE);
      return 0;
    } else {
      break;
    }
  }
  if (socket?.startsWith("path=")) socket = socket.slice(5);
  if (!socket) {
    io.err(`dvmm remote: --api-socket PATH is required\n${REMOTE_USAGE}`);
    return 2;
  }
  const cmd = argv[i];
  if (!cmd) {
    io.err(`dvmm remote: no command given\n${REMOTE_USAGE}`);
    return 2;
  }
  let call: Call;
  try {
    call = await buildCall(cmd, argv.slice(i + 1), io);
  } catch (e) {
    if (e instanceof UsageError || e instanceof ConfigError) {
      io.err(`dvmm remote: ${e.message}`);
      return 2;
    }
    io.err(`dvmm remote: ${(e as Error).message}`);
    return 1;
  }
  let reply: ApiReply;
  try {
    reply = await apiRequest(socket, call.method, `${API_PREFIX}${call.endpoint}`, call.body, call.fds);
  } catch (e) {
    io.err(`dvmm remote: cannot reach the API at ${socket}: ${(e as Error).message}`);
    return 1;
  }
  if (reply.status >= 200 && reply.status < 300) {
    if (reply.body !== "") io.out(reply.body);
    return 0;
  }
  io.err(`dvmm remote: ${call.endpoint} failed (HTTP ${reply.status}): ${errorMessages(reply).join(": ")}`);
  return 1;
}
