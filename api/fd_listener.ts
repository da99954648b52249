/**
 * `--api-socket fd=N`: serve the REST API on a listening socket inherited from the parent process.
 *
 * `Deno.serve` only listens on addresses it binds itself; Node's HTTP server (through Deno's `node:http`)
 * can adopt an already-listening descriptor. Each request is turned into a web `Request` for the same
 * handler `Deno.serve` uses, so routes, status codes, size limits and error bodies are identical.
 */
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import { Readable } from "node:stream";
import type { Logger } from "../vmm/log.ts";

/** A server on an inherited descriptor. */
export interface FdServer {
  close(): Promise<void>;
}

function toRequest(req: IncomingMessage): Request {
  const headers = new Headers();
  for (const [name, value] of Object.entries(req.headers)) {
    if (Array.isArray(value)) value.forEach((v) => headers.append(name, v));
    else if (value !== undefined) headers.set(name, value);
  }
  const method = req.method ?? "GET";
  const hasBody = method !== "GET" && method !== "HEAD";
  return new Request(`http://localhost${req.url ?? "/"}`, {
    method,
    headers,
    body: hasBody ? Readable.toWeb(req) as ReadableStream<Uint8Array> : undefined,
    // A streamed request body (the handler enforces the size limit while reading it).
    duplex: "half",
  } as RequestInit);
}

async function reply(res: ServerResponse, response: Response): Promise<void> {
  res.statusCode = response.status;
  response.headers.forEach((value, name) => res.setHeader(name, value));
  res.end(new Uint8Array(await response.arrayBuffer()));
}

/** Serves `handler` on the listening socket `fd`; rejects when `fd` is not one. */
export function serveOnFd(
  fd: number,
  handler: (req: Request) => Response | Promise<Response>,
  log: Logger,
): Promise<FdServer> {
  const server = createServer((req, res) => {
    (async () => {
      let response: Response;
      try {
        response = await handler(toRequest(req));
      } catch (e) {
        log.error(`API handler failed: ${(e as Error)?.stack ?? e}`);
        response = Response.json(["internal error in the API server", String((e as Error)?.message ?? e)], {
          status: 500,
        });
      }
      await reply(res, response);
    })().catch((e) => {
      log.warn(`API reply failed: ${(e as Error).message}`);
      res.destroy();
    });
  });
  // Garbage on a connection: drop that connection, keep serving.
  server.on("clientError", (_e, socket) => socket.destroy());
  return new Promise((resolve, reject) => {
    server.once(
      "error",
      (e) => reject(new Error(`--api-socket fd=${fd}: not an open, listening socket (${e.message})`)),
    );
    server.listen({ fd }, () => {
      log.info(`API server listening on inherited fd ${fd}`);
      resolve({
        close: () => new Promise<void>((done) => server.close(() => done())),
      });
    });
  });
}
