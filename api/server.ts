/**
 * The REST API: HTTP/1.1 on a UNIX socket (`Deno.serve`), `http://localhost/api/v1/<endpoint>`, with
 * Cloud Hypervisor's endpoints, methods and status codes (as its OpenAPI document states them). Every
 * request becomes one {@link VmmRequest} for the control loop; the server holds no VM state.
 *
 * Errors are answered with a JSON array of messages, outermost first.
 */
import type { z } from "zod";
import type { ControlLoop, RequestKind, VmmErrorKind, VmmRequest, VmmResponse } from "../vmm/control.ts";
import { type Logger, logger } from "../vmm/log.ts";
import {
  DeviceConfigSchema,
  DiskConfigSchema,
  formatZodError,
  FsConfigSchema,
  GenericVhostUserConfigSchema,
  NetConfigSchema,
  PmemConfigSchema,
  ReceiveMigrationDataSchema,
  RestoreConfigSchema,
  SendMigrationDataSchema,
  VdpaConfigSchema,
  VmAddUserDeviceSchema,
  VmConfigSchema,
  VmCoredumpDataSchema,
  VmRemoveDeviceSchema,
  VmResizeDiskSchema,
  VmResizeSchema,
  VmResizeZoneSchema,
  VmSnapshotConfigSchema,
  VsockConfigSchema,
} from "./schemas.ts";

export const API_PREFIX = "/api/v1/";
/** Largest accepted request body. */
export const MAX_BODY_BYTES = 1024 * 1024;

export interface Route {
  method: "GET" | "PUT";
  /** Schema of the JSON body, for endpoints that take one. */
  body?: z.ZodTypeAny;
  /** Name of the body's schema in the OpenAPI document. */
  bodyName?: string;
}

/** Every endpoint, named as in the path (`/api/v1/<name>`); the name is also the control request kind. */
export const ROUTES: Record<RequestKind, Route> = {
  "vmm.ping": { method: "GET" },
  "vmm.shutdown": { method: "PUT" },
  "vm.info": { method: "GET" },
  "vm.counters": { method: "GET" },
  "vm.create": { method: "PUT", body: VmConfigSchema, bodyName: "VmConfig" },
  "vm.delete": { method: "PUT" },
  "vm.boot": { method: "PUT" },
  "vm.pause": { method: "PUT" },
  "vm.resume": { method: "PUT" },
  "vm.shutdown": { method: "PUT" },
  "vm.reboot": { method: "PUT" },
  "vm.power-button": { method: "PUT" },
  "vm.nmi": { method: "PUT" },
  "vm.resize": { method: "PUT", body: VmResizeSchema, bodyName: "VmResize" },
  "vm.resize-disk": { method: "PUT", body: VmResizeDiskSchema, bodyName: "VmResizeDisk" },
  "vm.resize-zone": { method: "PUT", body: VmResizeZoneSchema, bodyName: "VmResizeZone" },
  "vm.add-device": { method: "PUT", body: DeviceConfigSchema, bodyName: "DeviceConfig" },
  "vm.remove-device": { method: "PUT", body: VmRemoveDeviceSchema, bodyName: "VmRemoveDevice" },
  "vm.add-disk": { method: "PUT", body: DiskConfigSchema, bodyName: "DiskConfig" },
  "vm.add-fs": { method: "PUT", body: FsConfigSchema, bodyName: "FsConfig" },
  "vm.add-generic-vhost-user": {
    method: "PUT",
    body: GenericVhostUserConfigSchema,
    bodyName: "GenericVhostUserConfig",
  },
  "vm.add-pmem": { method: "PUT", body: PmemConfigSchema, bodyName: "PmemConfig" },
  "vm.add-net": { method: "PUT", body: NetConfigSchema, bodyName: "NetConfig" },
  "vm.add-vsock": { method: "PUT", body: VsockConfigSchema, bodyName: "VsockConfig" },
  "vm.add-vdpa": { method: "PUT", body: VdpaConfigSchema, bodyName: "VdpaConfig" },
  "vm.add-user-device": { method: "PUT", body: VmAddUserDeviceSchema, bodyName: "VmAddUserDevice" },
  "vm.snapshot": { method: "PUT", body: VmSnapshotConfigSchema, bodyName: "VmSnapshotConfig" },
  "vm.coredump": { method: "PUT", body: VmCoredumpDataSchema, bodyName: "VmCoredumpData" },
  "vm.restore": { method: "PUT", body: RestoreConfigSchema, bodyName: "RestoreConfig" },
  "vm.receive-migration": {
    method: "PUT",
    body: ReceiveMigrationDataSchema,
    bodyName: "ReceiveMigrationData",
  },
  "vm.send-migration": { method: "PUT", body: SendMigrationDataSchema, bodyName: "SendMigrationData" },
};

const STATUS: Record<VmmErrorKind, number> = {
  NotCreated: 404,
  WrongState: 405,
  BadRequest: 400,
  Conflict: 409,
  NotFound: 404,
  TooManyRequests: 429,
  NotImplemented: 500,
  ShuttingDown: 500,
  Internal: 500,
};

/** Where the document gives an endpoint its own code for a failure. */
const STATUS_OVERRIDES: Partial<Record<RequestKind, Partial<Record<VmmErrorKind, number>>>> = {
  // "404: The VM instance could not be restored because it is already created."
  "vm.restore": { WrongState: 404 },
};

export function statusFor(kind: RequestKind, error: VmmErrorKind): number {
  return STATUS_OVERRIDES[kind]?.[error] ?? STATUS[error];
}

function errorResponse(status: number, messages: string[], headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(messages), {
    status,
    headers: { "content-type": "application/json", ...headers },
  });
}

class BodyTooLarge extends Error {}

async function readBody(req: Request, limit: number): Promise<Uint8Array> {
  const declared = req.headers.get("content-length");
  if (declared !== null && Number(declared) > limit) throw new BodyTooLarge();
  if (!req.body) return new Uint8Array(0);
  const chunks: Uint8Array[] = [];
  let total = 0;
  const reader = req.body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    total += value.length;
    if (total > limit) {
      await reader.cancel().catch(() => {});
      throw new BodyTooLarge();
    }
    chunks.push(value);
  }
  const out = new Uint8Array(total);
  let off = 0;
  for (const c of chunks) {
    out.set(c, off);
    off += c.length;
  }
  return out;
}

/** Turn a request body into the typed body for the control loop, or an error response. */
async function decodeBody(kind: RequestKind, route: Route, req: Request): Promise<unknown | Response> {
  if (!route.body) return undefined;
  let bytes: Uint8Array;
  try {
    bytes = await readBody(req, MAX_BODY_BYTES);
  } catch (e) {
    if (e instanceof BodyTooLarge) {
      return errorResponse(413, [`request body of ${kind} exceeds the limit of ${MAX_BODY_BYTES} bytes`]);
    }
    return errorResponse(400, [`cannot read the request body of ${kind}`, (e as Error).message]);
  }
  const text = new TextDecoder().decode(bytes).trim();
  if (text === "") return errorResponse(400, [`${kind} needs a JSON ${route.bodyName} body`]);
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    return errorResponse(400, [`the body of ${kind} is not valid JSON`, (e as Error).message]);
  }
  if (json === null || typeof json !== "object" || Array.isArray(json)) {
    return errorResponse(400, [`the body of ${kind} must be a JSON object (${route.bodyName})`]);
  }
  const r = route.body.safeParse(json);
  if (!r.success) {
    return errorResponse(400, [`invalid ${route.bodyName}`, ...formatZodError(r.error, route.bodyName!)]);
  }
  const nets = kind === "vm.add-net" ? [r.data] : kind === "vm.create" ? (r.data.net ?? []) : [];
  if (nets.some((n: { fds?: number[] }) => n.fds !== undefined)) {
    return errorResponse(400, [
      `invalid ${route.bodyName}`,
      "net.fds: file descriptors cannot be given in a JSON body (they are process-local); " +
      "use the tap field, or --net fd=N on the command line",
    ]);
  }
  return r.data;
}

/** The request handler, separate from the socket so it can be exercised on its own. */
export function createHandler(
  loop: ControlLoop,
  log: Logger = logger("api"),
): (req: Request) => Promise<Response> {
  return async (req: Request): Promise<Response> => {
    let path: string;
    try {
      path = new URL(req.url).pathname;
    } catch {
      return errorResponse(400, ["malformed request URL"]);
    }
    if (!path.startsWith(API_PREFIX)) return errorResponse(404, [`unknown path ${path}`]);
    const name = path.slice(API_PREFIX.length);
    if (!Object.hasOwn(ROUTES, name)) return errorResponse(404, [`unknown endpoint ${name}`]);
    const kind = name as RequestKind;
    const route = ROUTES[kind];
    if (req.method !== route.method) {
      return errorResponse(405, [`${kind} expects ${route.method}, not ${req.method}`], {
        allow: route.method,
      });
    }
    const body = await decodeBody(kind, route, req);
    if (body instanceof Response) return body;

    const reply = await new Promise<VmmResponse>((resolve) => {
      loop.submit({ kind, body, reply: resolve } as VmmRequest);
    });
    if (reply.ok) {
      if (reply.body === undefined) return new Response(null, { status: 204 });
      return new Response(JSON.stringify(reply.body), {
        status: 200,
        headers: { "content-type": "application/json" },
      });
    }
    const status = statusFor(kind, reply.error.kind);
    log.debug(`${kind} → ${status}: ${reply.error.messages.join(": ")}`);
    return errorResponse(status, reply.error.messages);
  };
}

// ---------------------------------------------------------------------------------------------------
// The socket

export type ApiSocketSpec = { path: string } | { fd: number };

/** Parse an `--api-socket` value: `path=PATH`, `fd=N`, or a bare path. */
export function parseApiSocketOption(value: string): ApiSocketSpec {
  if (value.startsWith("fd=")) {
    const fd = Number(value.slice(3));
    if (!/^\d+$/.test(value.slice(3)) || !Number.isSafeInteger(fd)) {
      throw new Error(`--api-socket: fd must be a file descriptor number, got '${value.slice(3)}'`);
    }
    return { fd };
  }
  const path = value.startsWith("path=") ? value.slice(5) : value;
  if (path === "") throw new Error("--api-socket: expected path=PATH or fd=N");
  if (path.includes(",")) {
    throw new Error(`--api-socket: unexpected ',' in '${value}' (use path=PATH or fd=N)`);
  }
  return { path };
}

export interface ApiServer {
  /** The socket path, or `fd=N` for an inherited socket. */
  readonly path: string;
  /** Stop accepting, finish the replies under way, and remove the socket file. */
  close(): Promise<void>;
}

async function socketIsLive(path: string): Promise<boolean> {
  try {
    const conn = await Deno.connect({ transport: "unix", path });
    conn.close();
    return true;
  } catch {
    return false;
  }
}

/** Make `path` free for a new socket: replace a stale socket file, refuse a live one or anything else. */
async function claimSocketPath(path: string): Promise<void> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.lstat(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return;
    throw e;
  }
  if (!info.isSocket) {
    throw new Error(`API socket path ${path} exists and is not a socket; refusing to replace it`);
  }
  if (await socketIsLive(path)) {
    throw new Error(`API socket ${path} is in use by another process (a connection to it succeeded)`);
  }
  await Deno.remove(path);
}

/** Listen on the API socket and serve the control loop there. */
export async function startApiServer(
  spec: ApiSocketSpec,
  loop: ControlLoop,
  log: Logger = logger("api"),
): Promise<ApiServer> {
  if ("fd" in spec) {
    // Node's HTTP stack is loaded only for an inherited socket: it is heavy at start-up.
    const { serveOnFd } = await import("./fd_listener.ts");
    const fdServer = await serveOnFd(spec.fd, createHandler(loop, log), log);
    return { path: `fd=${spec.fd}`, close: () => fdServer.close() };
  }
  const path = spec.path;
  await claimSocketPath(path);
  const handler = createHandler(loop, log);
  let server: Deno.HttpServer<Deno.UnixAddr>;
  try {
    server = Deno.serve({
      path,
      onListen: () => {},
      onError: (e) => {
        log.error(`API handler failed: ${(e as Error)?.stack ?? e}`);
        return errorResponse(500, ["internal error in the API server", String((e as Error)?.message ?? e)]);
      },
    }, handler);
  } catch (e) {
    throw new Error(`cannot listen on API socket ${path}: ${(e as Error).message}`);
  }
  await Deno.chmod(path, 0o600);
  log.info(`API server listening on ${path}`);
  let closed: Promise<void> | null = null;
  return {
    path,
    close() {
      closed ??= (async () => {
        await server.shutdown().catch(() => {});
        await Deno.remove(path).catch(() => {});
      })();
      return closed;
    },
  };
}
