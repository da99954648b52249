/**
 * One API call, independent of the transport that carried it: the REST server and the D-Bus service
 * both turn what they received (an endpoint name, a JSON text, file descriptors) into exactly one
 * {@link VmmRequest} for the control loop and get back a status and a JSON text. Status codes are the
 * OpenAPI document's; a front end that has no status codes (D-Bus) treats >= 300 as an error whose
 * body is the JSON array of messages.
 */
import type { ControlLoop, RequestKind, VmmErrorKind, VmmRequest, VmmResponse } from "../vmm/control.ts";
import { type Logger, logger } from "../vmm/log.ts";
import { type Route, ROUTES } from "./routes.ts";
import { readConfig } from "../vmm/vm_config.ts";
import { closeFd } from "../ffi/socket.ts";

/** The outcome of one call: an HTTP status and, where there is one, a JSON body. */
export interface ApiResult {
  status: number;
  /** For 405: the method the endpoint takes. */
  allow?: string;
  /** JSON text; absent for 204. */
  body?: string;
}

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

/** An error result: the document's JSON array of messages, outermost first. */
export function errorResult(status: number, messages: string[]): ApiResult {
  return { status, body: JSON.stringify(messages) };
}

/**
 * The first object member named twice in a (syntactically valid) JSON text, as a dotted path, or null.
 * JSON.parse keeps the last; Cloud Hypervisor's reader (serde) refuses the text, and so does dvmm.
 */
export function duplicateKey(text: string): string | null {
  const stack: { keys: Set<string> | null; expectKey: boolean; key: string }[] = [];
  // The enclosing objects' current members (array levels carry no name).
  const path = () => stack.slice(0, -1).filter((f) => f.keys).map((f) => f.key).join(".");
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === '"') {
      let j = i + 1;
      while (text[j] !== '"') j += text[j] === "\\" ? 2 : 1;
      const top = stack[stack.length - 1];
      if (top?.keys && top.expectKey) {
        const key = JSON.parse(text.slice(i, j + 1)) as string;
        if (top.keys.has(key)) return path() ? `${path()}.${key}` : key;
        top.keys.add(key);
        top.key = key;
        top.expectKey = false;
      }
      i = j;
    } else if (c === "{") stack.push({ keys: new Set(), expectKey: true, key: "" });
    else if (c === "[") stack.push({ keys: null, expectKey: false, key: "" });
    else if (c === "}" || c === "]") stack.pop();
    else if (c === "," && stack[stack.length - 1]?.keys) stack[stack.length - 1].expectKey = true;
  }
  return null;
}

/** Cloud Hypervisor's JSON reader (serde_json) refuses texts nested deeper than this. */
export const MAX_JSON_DEPTH = 128;

/** The deepest nesting of objects and arrays in a JSON text (strings skipped). */
export function jsonDepth(text: string): number {
  let depth = 0;
  let max = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x22) { // a string: skip to its closing quote
      for (i++; i < text.length && text.charCodeAt(i) !== 0x22; i++) if (text.charCodeAt(i) === 0x5c) i++;
    } else if (c === 0x7b || c === 0x5b) max = Math.max(max, ++depth);
    else if (c === 0x7d || c === 0x5d) depth--;
  }
  return max;
}

type Decoded =
  | { ok: true; body: unknown; used: number[] }
  | { ok: false; status: number; messages: string[] };

/**
 * The typed body of a call, read the way Cloud Hypervisor reads it (unknown fields ignored and logged,
 * `null` as absent), with the descriptors the endpoint takes: the taps of `vm.add-net`.
 */
function decodeBody(kind: RequestKind, route: Route, text: string, fds: number[], log: Logger): Decoded {
  const bad = (...messages: string[]): Decoded => ({ ok: false, status: 400, messages });
  if (!route.body) return { ok: true, body: undefined, used: [] };
  if (text.trim() === "") return bad(`${kind} needs a JSON ${route.bodyName} body`);
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    return bad(`the body of ${kind} is not valid JSON`, (e as Error).message);
  }
  if (json === null || typeof json !== "object" || Array.isArray(json)) {
    return bad(`the body of ${kind} must be a JSON object (${route.bodyName})`);
  }
  if (jsonDepth(text) > MAX_JSON_DEPTH) {
    return bad(`the body of ${kind} is nested more than ${MAX_JSON_DEPTH} levels deep`);
  }
  const dup = duplicateKey(text);
  if (dup !== null) return bad(`the body of ${kind} names the field '${dup}' twice`);
  const r = readConfig(
    route.body,
    json,
    route.bodyName!,
    (field: string) => log.info(`${kind}: ignoring unknown field ${field}`),
  );
  if (!r.ok) return bad(`invalid ${route.bodyName}`, ...r.problems);
  const body = r.value as Record<string, unknown>;
  let used: number[] = [];
  if (kind === "vm.add-net" && fds.length > 0) {
    // As Cloud Hypervisor: the descriptors sent with the request are the device's taps.
    body.fds = fds;
    used = fds;
  }
  if (kind === "vm.restore" && fds.length > 0) {
    // As Cloud Hypervisor: the descriptors go to net_fds in order, num_fds each.
    const list = (body.net_fds as { id: string; num_fds: number; fds?: number[] }[] | undefined) ?? [];
    const want = list.reduce((n, e) => n + e.num_fds, 0);
    if (want !== fds.length) {
      return bad(
        `invalid ${route.bodyName}`,
        `net_fds asks for ${want} descriptor(s), ${fds.length} were sent`,
      );
    }
    let at = 0;
    for (const e of list) {
      e.fds = fds.slice(at, at + e.num_fds);
      at += e.num_fds;
    }
    used = fds;
  } else if (
    kind === "vm.restore" && (body.net_fds as { fds?: number[] }[] | undefined)?.some((e) => e.fds)
  ) {
    return bad(
      `invalid ${route.bodyName}`,
      "net_fds.fds: descriptors cannot be given as numbers in a JSON body; send them with the request (SCM_RIGHTS)",
    );
  }
  const nets = kind === "vm.add-net" ? [body] : kind === "vm.create" ? ((body.net as unknown[]) ?? []) : [];
  if (used.length === 0 && nets.some((n) => (n as { fds?: number[] }).fds !== undefined)) {
    return bad(
      `invalid ${route.bodyName}`,
      "net.fds: file descriptors cannot be given as numbers in a JSON body (they are process-local); " +
        "send the tap descriptors with the request (SCM_RIGHTS), as ch-remote add-net fd=... does",
    );
  }
  return { ok: true, body, used };
}

/** Endpoints that take descriptors in Cloud Hypervisor, for what dvmm does not build yet. */
const FD_TAKERS_NOT_BUILT: Partial<Record<RequestKind, string>> = {
  "vm.add-device": "a VFIO device given as a descriptor",
  "vm.receive-migration": "receiving a migration (vfio_fds)",
};

/**
 * Run one call of endpoint `kind` with the JSON `text` it carried ("" for none) and the descriptors
 * that came with it. Every descriptor is either handed on to the VM (which then owns it) or closed
 * here: none is leaked, none silently dropped while the call succeeds.
 */
export async function callApi(
  loop: ControlLoop,
  kind: RequestKind,
  text: string,
  fds: number[] = [],
  log: Logger = logger("api"),
): Promise<ApiResult> {
  const route = ROUTES[kind];
  let decoded: Decoded;
  try {
    decoded = decodeBody(kind, route, text, fds, log);
  } catch (e) {
    fds.forEach(closeFd); // never leak what came with a request, whatever went wrong
    throw e;
  }
  const unused = new Set(fds);
  if (!decoded.ok) {
    unused.forEach(closeFd);
    return errorResult(decoded.status, decoded.messages);
  }
  decoded.used.forEach((fd) => unused.delete(fd));
  if (unused.size > 0) {
    unused.forEach(closeFd);
    if (decoded.used.length === 0) {
      const why = FD_TAKERS_NOT_BUILT[kind];
      return errorResult(400, [
        why
          ? `${kind}: ${why} with descriptors is not implemented in dvmm yet (${fds.length} received and closed)`
          : `${kind} does not take file descriptors (${fds.length} received and closed)`,
      ]);
    }
  }
  const reply = await new Promise<VmmResponse>((resolve) => {
    loop.submit({ kind, body: decoded.body, reply: resolve } as VmmRequest);
  });
  if (reply.ok) {
    return reply.body === undefined ? { status: 204 } : { status: 200, body: JSON.stringify(reply.body) };
  }
  // The VM did not take the descriptors it was offered: they are still ours to close.
  decoded.used.forEach(closeFd);
  const status = statusFor(kind, reply.error.kind);
  log.debug(`${kind} → ${status}: ${reply.error.messages.join(": ")}`);
  return errorResult(status, reply.error.messages);
}
