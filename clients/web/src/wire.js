// One WebSocket connection to a Bento server, speaking protocol v1 (CBOR maps in
// binary messages): the hello, requests matched to replies by id, and events.
//
// It never retries and never reconnects: a connection that fails or closes is
// finished, and its owner (session.js) decides what comes next. A request that
// gets no reply within its timeout closes the connection, because a server that
// stops answering one request has stopped answering all of them.

import { Decoder, Encoder } from 'cbor-x/index-no-eval';

export const CLIENT_NAME = 'bento-web/0.1';
const REQUEST_TIMEOUT_MS = 15000;

// Plain CBOR, as PROTOCOL.md allows it: no tags (cbor-x tags typed arrays,
// records and Maps unless told not to), text-keyed maps as objects.
const encoder = new Encoder({
  useRecords: false, mapsAsObjects: true, tagUint8Array: false, useTag259ForMaps: false,
  variableMapSize: true,
});
const decoder = new Decoder({ useRecords: false, mapsAsObjects: true });

export function encode(value) {
  return encoder.encode(value);
}

export function decode(bytes) {
  return decoder.decode(bytes);
}

/** An error the server answered: `code` is PROTOCOL.md's error code. */
export class ServerError extends Error {
  constructor(code, message, extra = {}) {
    super(message);
    this.code = code;
    this.extra = extra;
  }
}

/** The connection itself failed or closed. */
export class ConnectionLost extends Error {}

/** The WebSocket URL of the server that served this page: `v1` beside the page. */
export function serverUrl(location) {
  const url = new URL('v1', location.href);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  url.hash = '';
  url.search = '';
  return url.href;
}

export class Connection {
  /**
   * `onEvent(msg)` gets every server event; `onClose(reason)` is called once
   * when the connection is gone (whoever closed it).
   */
  constructor(url, { onEvent, onClose }) {
    this.url = url;
    this.onEvent = onEvent;
    this.onClose = onClose;
    this.nextId = 1;
    this.pending = new Map();
    this.closed = null;
    this.ws = null;
  }

  /** Opens the socket and says hello; resolves with the hello reply. */
  async open(auth) {
    const ws = new WebSocket(this.url);
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new ConnectionLost(`cannot connect to ${this.url}`));
      ws.onclose = (ev) => reject(new ConnectionLost(closeReason(ev)));
    });
    ws.onmessage = (ev) => this._message(ev.data);
    ws.onerror = () => {};
    ws.onclose = (ev) => this._gone(closeReason(ev));
    const hello = { proto: 1, client: CLIENT_NAME };
    if (auth) hello.auth = auth;
    return this.request('hello', hello);
  }

  /** Sends a request and resolves with its reply; rejects with ServerError or ConnectionLost. */
  request(op, fields = {}, timeoutMs = REQUEST_TIMEOUT_MS) {
    if (this.closed) return Promise.reject(new ConnectionLost(this.closed));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.close(`no reply to ${op} within ${timeoutMs / 1000} s`);
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.send({ op, id, ...fields });
    });
  }

  /** Sends a message that gets no reply (`ack`, `input`). */
  send(msg) {
    if (this.closed) return;
    this.ws.send(encode(msg));
  }

  close(reason = 'closed by the page') {
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000);
    this._gone(reason);
  }

  _message(data) {
    if (!(data instanceof ArrayBuffer)) {
      this.close('the server sent a text message (the protocol has only binary ones)');
      return;
    }
    let msg;
    try {
      msg = decode(new Uint8Array(data));
    } catch (err) {
      this.close(`the server sent a message that is not CBOR: ${err.message}`);
      return;
    }
    if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) {
      this.close('the server sent a message that is not a map');
      return;
    }
    if ('ev' in msg) {
      this.onEvent(msg);
      return;
    }
    const waiter = this.pending.get(msg.id);
    if (!waiter) return;
    this.pending.delete(msg.id);
    clearTimeout(waiter.timer);
    if (msg.ok === true) {
      waiter.resolve(msg);
    } else {
      const error = msg.error || {};
      const { code, message, ...extra } = error;
      waiter.reject(new ServerError(String(code), String(message), extra));
    }
  }

  _gone(reason) {
    if (this.closed) return;
    this.closed = reason;
    for (const waiter of this.pending.values()) {
      clearTimeout(waiter.timer);
      waiter.reject(new ConnectionLost(reason));
    }
    this.pending.clear();
    this.onClose(reason);
  }
}

function closeReason(ev) {
  const why = ev.reason ? `: ${ev.reason}` : '';
  return ev.code === 1006 ? 'connection lost' : `closed by the server (${ev.code}${why})`;
}
