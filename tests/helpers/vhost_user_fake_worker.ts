/// <reference lib="deno.worker" />
/**
 * A scripted vhost-user back-end for tests/vhost_user_test.ts, on its own thread (the front-end under
 * test blocks while it waits for replies). It only checks framing: it accepts one connection on the
 * listening socket it is given, answers what a back-end answers, records every message (with the
 * descriptors that came along) and posts the record when the front-end hangs up.
 *
 * Modes: "normal"; "hangup" (close the connection on request `at`); "garbage" (answer request `at`
 * with another request code); "silent" (never answer request `at`); "nack" (ack request `at` with 1).
 */
import { shim } from "../../ffi/shim.ts";
import { POLLIN } from "../../ffi/kvm_constants.ts";
import {
  configPayload,
  decodeHeader,
  encodeMessage,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  HEADER_SIZE,
  readConfig,
  u64Payload,
  VHOST_USER,
  vringStatePayload,
} from "../../devices/virtio/vhost_user.ts";

export interface FakeBackendInit {
  listenFd: number;
  mode: "normal" | "hangup" | "garbage" | "silent" | "nack";
  at?: number;
  features: bigint;
  protocolFeatures: bigint;
  queueNum: number;
  config?: Uint8Array;
  /** GET_VRING_BASE answers this. */
  vringBase?: number;
}

export interface FakeMessage {
  request: number;
  flags: number;
  payload: Uint8Array;
  fds: number;
  /** SET_MEM_TABLE: the first 16 bytes read from each region's memfd (hex). */
  memfdHeads?: string[];
}

export interface FakeReport {
  messages: FakeMessage[];
  /** Rings whose kick eventfd had been signalled when the front-end hung up. */
  kicked: number[];
  error?: string;
}

const s = shim();
const hex = (b: Uint8Array) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");

function serve(init: FakeBackendInit): FakeReport {
  const messages: FakeMessage[] = [];
  const kicks = new Map<number, number>();
  let conn = -1;
  for (let i = 0; i < 500 && conn < 0; i++) {
    s.kvs_poll1(init.listenFd, POLLIN, 20);
    conn = Number(s.kvs_accept(init.listenFd));
  }
  if (conn < 0) return { messages, kicked: [], error: "no connection" };
  const slots = new Int32Array(9);
  const readExact = (buf: Uint8Array): number[] | null => {
    let off = 0;
    const fds: number[] = [];
    while (off < buf.length) {
      if (Number(s.kvs_poll1(conn, POLLIN, 10_000)) <= 0) return null;
      slots[0] = 0;
      const part = buf.subarray(off);
      const n = Number(s.kvs_recv_fds(conn, part, part.length, slots, 8));
      for (let i = 0; i < slots[0]; i++) fds.push(slots[1 + i]);
      if (n === -11) continue;
      if (n <= 0) return null;
      off += n;
    }
    return fds;
  };
  const send = (b: Uint8Array) => s.kvs_send_fds(conn, b, b.length, null, 0);
  const reply = (request: number, payload: Uint8Array) => send(encodeMessage(request, payload, FLAG_REPLY));
  try {
    for (;;) {
      const hdr = new Uint8Array(HEADER_SIZE);
      const fds = readExact(hdr);
      if (fds === null) break;
      const h = decodeHeader(hdr);
      const payload = new Uint8Array(h.size);
      const more = h.size ? readExact(payload) : [];
      if (more === null) break;
      fds.push(...more);
      const m: FakeMessage = { request: h.request, flags: h.flags, payload, fds: fds.length };
      messages.push(m);
      if (h.request === VHOST_USER.SET_MEM_TABLE) {
        m.memfdHeads = fds.map((fd) => {
          const b = new Uint8Array(16);
          s.kvs_pread(fd, b, 16, 0);
          return hex(b);
        });
      }
      const ring = h.size >= 8 ? Number(new DataView(payload.buffer).getBigUint64(0, true) & 0xffn) : -1;
      if (h.request === VHOST_USER.SET_VRING_CALL && fds.length === 1) {
        const one = new Uint8Array(new BigUint64Array([1n]).buffer);
        s.kvs_write(fds[0], one, 8); // as if the back-end had used a buffer
      }
      if (h.request === VHOST_USER.SET_VRING_KICK && fds.length === 1) {
        kicks.set(ring, fds[0]);
        fds.length = 0;
      }
      if (h.request !== VHOST_USER.SET_VRING_KICK || fds.length) { for (const fd of fds) s.kvs_close(fd); }

      if (init.at === h.request) {
        if (init.mode === "hangup") break;
        if (init.mode === "silent") continue;
        if (init.mode === "garbage") {
          reply(VHOST_USER.SET_MEM_TABLE, u64Payload(0));
          continue;
        }
        if (init.mode === "nack") {
          reply(h.request, u64Payload(1));
          continue;
        }
      }
      switch (h.request) {
        case VHOST_USER.GET_FEATURES:
          reply(h.request, u64Payload(init.features));
          break;
        case VHOST_USER.GET_PROTOCOL_FEATURES:
          reply(h.request, u64Payload(init.protocolFeatures));
          break;
        case VHOST_USER.GET_QUEUE_NUM:
          reply(h.request, u64Payload(init.queueNum));
          break;
        case VHOST_USER.GET_CONFIG: {
          const c = readConfig(payload);
          reply(h.request, configPayload(c.offset, c.size, c.flags, init.config));
          break;
        }
        case VHOST_USER.GET_VRING_BASE:
          reply(
            h.request,
            vringStatePayload(new DataView(payload.buffer).getUint32(0, true), init.vringBase ?? 0),
          );
          break;
        default:
          if (h.flags & FLAG_NEED_REPLY) reply(h.request, u64Payload(0));
      }
    }
  } finally {
    s.kvs_close(conn);
  }
  const kicked: number[] = [];
  const word = new Uint8Array(8);
  for (const [ring, fd] of kicks) {
    if (Number(s.kvs_read(fd, word, 8)) === 8) kicked.push(ring);
    s.kvs_close(fd);
  }
  return { messages, kicked };
}

self.onmessage = (ev: MessageEvent<FakeBackendInit>) => {
  let report: FakeReport;
  try {
    report = serve(ev.data);
  } catch (e) {
    report = { messages: [], kicked: [], error: (e as Error).stack };
  }
  self.postMessage(report);
  self.close();
};
