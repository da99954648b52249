/**
 * HTTP/1.1 as Cloud Hypervisor's API server speaks it on its UNIX socket, byte for byte where clients
 * look: a status line with no reason phrase (`HTTP/1.1 200 \r\n`: ch-remote reads everything between
 * `HTTP/1.1 ` and the CR as the status number), then `Server`, `Connection`, `Content-Type` and
 * `Content-Length` spelled as CH spells them (ch-remote looks `Content-Length` up by its exact case).
 *
 * {@link RequestReader} takes the bytes (and descriptors) of one connection as they arrive and yields
 * whole requests; it never throws on bad input, it reports an {@link HttpError} with its status.
 */

/** What the `Server` header says, as Cloud Hypervisor's. */
export const SERVER_NAME = "Cloud Hypervisor API";
/** Largest request head (request line and headers). */
export const MAX_HEAD_BYTES = 16 * 1024;

export interface HttpRequest {
  method: string;
  /** The path without query, e.g. `/api/v1/vm.info`. */
  path: string;
  /** Header values by lower-case name (repeated headers joined with ", "). */
  headers: Map<string, string>;
  body: Uint8Array;
  /** Descriptors that arrived with this request's bytes (SCM_RIGHTS); the receiver owns them. */
  fds: number[];
  /** Whether the client wants the connection kept open after the reply. */
  keepAlive: boolean;
}

/** A request that cannot be served; the connection is closed after the answer. */
export interface HttpError {
  status: number;
  message: string;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

function findHeadEnd(b: Uint8Array, from: number): number {
  for (let i = Math.max(0, from - 3); i + 3 < b.length; i++) {
    if (b[i] === 13 && b[i + 1] === 10 && b[i + 2] === 13 && b[i + 3] === 10) return i;
  }
  return -1;
}

/** Incremental parser for the requests of one connection (pipelined requests are kept in order). */
export class RequestReader {
  #buf = new Uint8Array(0);
  #fds: number[] = [];
  /** Where the search for the end of the head resumes. */
  #scanned = 0;
  #head: Head & { bodyAt: number } | null = null;
  #continueSent = false;

  constructor(readonly maxBody: number) {}

  /** Bytes received and not yet consumed by a whole request. */
  get buffered(): number {
    return this.#buf.length;
  }

  /** Descriptors received and not yet attached to a request (closed by the owner on teardown). */
  takeStrayFds(): number[] {
    return this.#fds.splice(0);
  }

  /** True once for a request that asked for `100 Continue` while its body has not all arrived. */
  takeContinue(): boolean {
    const h = this.#head;
    if (!h || !h.expectContinue || this.#continueSent || this.#buf.length >= h.bodyAt + h.length) {
      return false;
    }
    this.#continueSent = true;
    return true;
  }

  push(bytes: Uint8Array, fds: number[]): void {
    if (bytes.length > 0) {
      const next = new Uint8Array(this.#buf.length + bytes.length);
      next.set(this.#buf);
      next.set(bytes, this.#buf.length);
      this.#buf = next;
    }
    if (fds.length > 0) this.#fds.push(...fds);
  }

  /** The next whole request, null when more bytes are needed, or the error that ends the connection. */
  next(): HttpRequest | HttpError | null {
    if (!this.#head) {
      const end = findHeadEnd(this.#buf, this.#scanned);
      if (end < 0) {
        this.#scanned = this.#buf.length;
        if (this.#buf.length > MAX_HEAD_BYTES) {
          return { status: 400, message: `request head exceeds ${MAX_HEAD_BYTES} bytes` };
        }
        return null;
      }
      if (end > MAX_HEAD_BYTES) {
        return { status: 400, message: `request head exceeds ${MAX_HEAD_BYTES} bytes` };
      }
      const head = parseHead(decoder.decode(this.#buf.subarray(0, end)), this.maxBody);
      if ("status" in head) return head;
      this.#head = { ...head, bodyAt: end + 4 };
      this.#continueSent = false;
    }
    const h = this.#head;
    if (this.#buf.length < h.bodyAt + h.length) return null;
    const body = this.#buf.slice(h.bodyAt, h.bodyAt + h.length);
    this.#buf = this.#buf.slice(h.bodyAt + h.length);
    this.#scanned = 0;
    this.#head = null;
    return {
      method: h.method,
      path: h.path,
      headers: h.headers,
      body,
      fds: this.#fds.splice(0),
      keepAlive: h.keepAlive,
    };
  }
}

interface Head {
  method: string;
  path: string;
  headers: Map<string, string>;
  length: number;
  keepAlive: boolean;
  expectContinue: boolean;
}

function parseHead(text: string, maxBody: number): Head | HttpError {
  const lines = text.split("\r\n");
  const m = /^([A-Z]+) (\S+) HTTP\/1\.([01])$/.exec(lines[0]);
  if (!m) return { status: 400, message: "malformed request line" };
  const headers = new Map<string, string>();
  for (const line of lines.slice(1)) {
    const c = line.indexOf(":");
    const name = c > 0 ? line.slice(0, c) : "";
    if (!TOKEN.test(name)) return { status: 400, message: "malformed header line" };
    const key = name.toLowerCase();
    const value = line.slice(c + 1).trim();
    const prev = headers.get(key);
    if (key === "content-length" && prev !== undefined && prev !== value) {
      return { status: 400, message: "conflicting Content-Length headers" };
    }
    headers.set(key, prev === undefined || key === "content-length" ? value : `${prev}, ${value}`);
  }
  if (headers.has("transfer-encoding")) {
    return {
      status: 400,
      message: "Transfer-Encoding is not supported: send the body with a Content-Length",
    };
  }
  let length = 0;
  const cl = headers.get("content-length");
  if (cl !== undefined) {
    if (!/^\d{1,16}$/.test(cl)) return { status: 400, message: "invalid Content-Length" };
    length = Number(cl);
    if (length > maxBody) {
      return { status: 413, message: `request body exceeds the limit of ${maxBody} bytes` };
    }
  }
  let path = m[2];
  if (/^https?:\/\//i.test(path)) {
    try {
      path = new URL(path).pathname;
    } catch {
      return { status: 400, message: "malformed request target" };
    }
  }
  const q = path.search(/[?#]/);
  if (q >= 0) path = path.slice(0, q);
  const connection = (headers.get("connection") ?? "").toLowerCase();
  const keepAlive = m[3] === "1" ? !/\bclose\b/.test(connection) : /\bkeep-alive\b/.test(connection);
  const expectContinue = (headers.get("expect") ?? "").toLowerCase() === "100-continue";
  return { method: m[1], path, headers, length, keepAlive, expectContinue };
}

/** The interim answer to `Expect: 100-continue`. */
export const CONTINUE_BYTES = encoder.encode("HTTP/1.1 100 Continue\r\n\r\n");

/**
 * One response, framed as Cloud Hypervisor frames it: no reason phrase, CH's header names and order,
 * `Content-Length` on every response (0 without a body), `Content-Type` with a body.
 */
export function formatResponse(
  status: number,
  body: string | undefined,
  opts: { keepAlive: boolean; allow?: string },
): Uint8Array<ArrayBuffer> {
  const payload = body === undefined ? undefined : encoder.encode(body);
  let head = `HTTP/1.1 ${status} \r\nServer: ${SERVER_NAME}\r\nConnection: ${
    opts.keepAlive ? "keep-alive" : "close"
  }\r\n`;
  if (opts.allow) head += `Allow: ${opts.allow}\r\n`;
  if (payload) head += "Content-Type: application/json\r\n";
  head += `Content-Length: ${payload?.length ?? 0}\r\n\r\n`;
  const h = encoder.encode(head);
  if (!payload) return h;
  const out = new Uint8Array(h.length + payload.length);
  out.set(h);
  out.set(payload, h.length);
  return out;
}
