/**
 * A small HTTP/1.1 client over a UNIX socket: one request per connection (`Connection: close`), the
 * reply read to its `Content-Length` (or to the end). File descriptors go with the request bytes as
 * SCM_RIGHTS, as Cloud Hypervisor's api_client sends them (`add-net fd=...`). Used by `dvmm remote`,
 * the tests and the benchmark.
 */
import { closeFd, readAsync, sendAllWithFds, unixConnect } from "../ffi/socket.ts";

export interface ApiReply {
  status: number;
  headers: Headers;
  /** The body as text ("" when there is none). */
  body: string;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/**
 * Send one request to the API socket at `socketPath`; `path` is like `/api/v1/vmm.ping`. `fds` are sent
 * with the request (they stay open here: the caller owns them).
 */
export async function apiRequest(
  socketPath: string,
  method: string,
  path: string,
  body?: unknown,
  fds: number[] = [],
): Promise<ApiReply> {
  const payload = body === undefined
    ? undefined
    : encoder.encode(typeof body === "string" ? body : JSON.stringify(body));
  let head =
    `${method} ${path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n`;
  if (payload) head += `Content-Type: application/json\r\nContent-Length: ${payload.length}\r\n`;
  else if (method !== "GET") head += "Content-Length: 0\r\n";
  head += "\r\n";
  const bytes = payload ? concat([encoder.encode(head), payload]) : encoder.encode(head);
  const raw = fds.length > 0
    ? await exchangeWithFds(socketPath, bytes, fds)
    : await exchange(socketPath, bytes);
  return parseResponse(raw);
}

/** Whether `raw` holds a whole response (head and the body its Content-Length announces). */
function complete(raw: Uint8Array): boolean {
  const end = indexOfCrlfCrlf(raw);
  if (end < 0) return false;
  const m = /\r\ncontent-length:\s*(\d+)/i.exec(decoder.decode(raw.subarray(0, end + 2)));
  return m !== null && raw.length >= end + 4 + Number(m[1]);
}

/** As {@link exchange}, with descriptors passed along with the request (through the shim). */
export async function exchangeWithFds(
  socketPath: string,
  bytes: Uint8Array,
  fds: number[],
): Promise<Uint8Array> {
  const fd = await unixConnect(socketPath);
  try {
    await sendAllWithFds(fd, Uint8Array.from(bytes), fds);
    const chunks: Uint8Array[] = [];
    const buf = new Uint8Array(64 * 1024);
    for (;;) {
      const n = await readAsync(fd, buf);
      if (n === 0) break;
      chunks.push(buf.slice(0, n));
      if (complete(concat(chunks))) break;
    }
    return concat(chunks);
  } finally {
    closeFd(fd);
  }
}

/** Write `bytes` to the socket and read until the server closes the connection. */
export async function exchange(socketPath: string, bytes: Uint8Array): Promise<Uint8Array> {
  const conn = await Deno.connect({ transport: "unix", path: socketPath });
  try {
    let off = 0;
    while (off < bytes.length) off += await conn.write(bytes.subarray(off));
    const chunks: Uint8Array[] = [];
    const buf = new Uint8Array(64 * 1024);
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      chunks.push(buf.slice(0, n));
      if (complete(concat(chunks))) break;
    }
    return concat(chunks);
  } finally {
    try {
      conn.close();
    } catch { /* already closed */ }
  }
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

function indexOfCrlfCrlf(b: Uint8Array): number {
  for (let i = 0; i + 3 < b.length; i++) {
    if (b[i] === 13 && b[i + 1] === 10 && b[i + 2] === 13 && b[i + 3] === 10) return i;
  }
  return -1;
}

/** Parse a complete HTTP/1.1 response (Content-Length, chunked, or read-to-close bodies). */
export function parseResponse(raw: Uint8Array): ApiReply {
  const end = indexOfCrlfCrlf(raw);
  if (end < 0) throw new Error("the server closed the connection without a complete HTTP response");
  const lines = decoder.decode(raw.subarray(0, end)).split("\r\n");
  const m = /^HTTP\/1\.[01] (\d{3})/.exec(lines[0]);
  if (!m) throw new Error(`malformed HTTP status line: ${lines[0]}`);
  const headers = new Headers();
  for (const line of lines.slice(1)) {
    const c = line.indexOf(":");
    if (c > 0) headers.append(line.slice(0, c).trim(), line.slice(c + 1).trim());
  }
  let rest = raw.subarray(end + 4);
  if ((headers.get("transfer-encoding") ?? "").toLowerCase().includes("chunked")) {
    const parts: Uint8Array[] = [];
    for (;;) {
      let i = 0;
      while (i + 1 < rest.length && !(rest[i] === 13 && rest[i + 1] === 10)) i++;
      const size = parseInt(decoder.decode(rest.subarray(0, i)), 16);
      if (!Number.isFinite(size) || size === 0) break;
      parts.push(rest.subarray(i + 2, i + 2 + size));
      rest = rest.subarray(i + 2 + size + 2);
    }
    rest = concat(parts);
  } else {
    const len = headers.get("content-length");
    if (len !== null) rest = rest.subarray(0, Number(len));
  }
  return { status: Number(m[1]), headers, body: decoder.decode(rest) };
}

/** The messages of an error reply (a JSON array of strings), or its raw text. */
export function errorMessages(reply: ApiReply): string[] {
  try {
    const v = JSON.parse(reply.body);
    if (Array.isArray(v)) return v.map(String);
  } catch { /* not JSON */ }
  return reply.body ? [reply.body] : [`HTTP ${reply.status}`];
}
