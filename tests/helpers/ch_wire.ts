/**
 * A client that reads responses exactly the way Cloud Hypervisor's own client (ch-remote's api_client)
 * does, so the tests hold dvmm to what real clients accept rather than to what curl forgives:
 *
 * - the status is the text between `HTTP/1.1 ` and the first CR, trimmed, parsed as an integer
 *   (a reason phrase after the number makes it fail);
 * - the body length comes from a header spelled exactly `Content-Length: ` (case-sensitive);
 * - without that header the response ends at the blank line (no body is read);
 * - with it, exactly that many bytes after the blank line are the body.
 *
 * Requests go out as ch-remote writes them, on one connection that can be reused (keep-alive).
 */

const encoder = new TextEncoder();
const decoder = new TextDecoder();

export interface ChReply {
  status: number;
  /** The body when a Content-Length was given, else null. */
  body: string | null;
  /** The raw head, for header checks. */
  head: string;
}

/** Thrown where ch-remote would fail to read the response (its StatusCodeParsing and friends). */
export class ChParseError extends Error {}

/** Parse one response from the front of `raw`; null while it is incomplete. */
export function chParse(raw: string): { reply: ChReply; rest: string } | null {
  const headEnd = raw.indexOf("\r\n\r\n");
  if (headEnd < 0) return null;
  const head = raw.slice(0, headEnd + 2);
  const bodyAt = headEnd + 4;
  const at = head.indexOf("Content-Length: ");
  let length: number | null = null;
  if (at >= 0) {
    const value = head.slice(at + "Content-Length: ".length, head.indexOf("\r", at)).trim();
    if (!/^\d+$/.test(value)) throw new ChParseError(`Content-Length '${value}' is not a number`);
    length = Number(value);
    if (raw.length < bodyAt + length) return null;
  }
  const o = head.indexOf("HTTP/1.1");
  if (o < 0) throw new ChParseError("no HTTP/1.1 status line");
  const statusText = head.slice(o + "HTTP/1.1 ".length, head.indexOf("\r", o)).trim();
  if (!/^\d+$/.test(statusText)) throw new ChParseError(`StatusCodeParsing(InvalidDigit): '${statusText}'`);
  const body = length === null ? null : raw.slice(bodyAt, bodyAt + length);
  return { reply: { status: Number(statusText), body, head }, rest: raw.slice(bodyAt + (length ?? 0)) };
}

/** One connection to the API, used for any number of requests in a row. */
export class ChConnection {
  #pending = "";
  private constructor(readonly conn: Deno.UnixConn) {}

  static async open(socket: string): Promise<ChConnection> {
    return new ChConnection(await Deno.connect({ transport: "unix", path: socket }));
  }

  /** Send one request as ch-remote frames it and read its response the way ch-remote does. */
  async request(method: "GET" | "PUT", endpoint: string, body?: string): Promise<ChReply> {
    let req = `${method} /api/v1/${endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n`;
    if (body !== undefined) {
      req += `Content-Type: application/json\r\nContent-Length: ${
        encoder.encode(body).length
      }\r\n\r\n${body}`;
    } else {
      req += "\r\n";
    }
    const bytes = encoder.encode(req);
    for (let off = 0; off < bytes.length;) off += await this.conn.write(bytes.subarray(off));
    const buf = new Uint8Array(256); // ch-remote reads 256 bytes at a time
    for (;;) {
      const parsed = chParse(this.#pending);
      if (parsed) {
        this.#pending = parsed.rest;
        return parsed.reply;
      }
      const n = await this.conn.read(buf);
      if (n === null) throw new ChParseError("the server closed the connection mid-response");
      this.#pending += decoder.decode(buf.subarray(0, n), { stream: true });
    }
  }

  close(): void {
    try {
      this.conn.close();
    } catch { /* closed */ }
  }
}
