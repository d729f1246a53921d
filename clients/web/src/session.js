// Following one session from the page: attach, show every frame exactly once,
// acknowledge what is safely stored, send input exactly once, and reconnect by
// itself with backoff, resuming from the last seq held.
//
// The same guarantees as the Python SDK (bento_clients/positions.py):
// - output: a frame at or below the held seq is a duplicate and dropped; a hole
//   becomes a gap so loss is never silent; a reattach asks for held + 1.
// - input: each input is recorded in the store with its seq before it is sent;
//   after every attach, whatever is pending above the server's `input_seq` is
//   sent again with the same seq (the server ignores a duplicate).
// - acks: an owner page acknowledges a frame only once the store has it, so the
//   server frees nothing this browser could not show again after a reload. A
//   page whose store is memory only never acknowledges.
// The DOM is not touched here: `view` (render.js) gets what to show.

import { Retry } from './retry.js';
import { Connection, ConnectionLost, ServerError, serverUrl } from './wire.js';

const POLL_RUNNING_MS = 1000;
const POLL_ENDED_MS = 5000;

export const TOKEN_SHAPE = /^bt[ov]_[A-Za-z0-9_-]{43}$/;

// The error events that refuse an input (docs/protocol.md, input).
const INPUT_REFUSALS = ['input_gap', 'limit', 'bad_request'];

/** What an error code means to the person looking at the page. */
export function explain(err) {
  if (!(err instanceof ServerError)) return err.message;
  switch (err.code) {
    case 'not_found':
      return 'This server does not know that token: it is mistyped, or its session '
        + 'was destroyed or has expired.';
    case 'limit':
      return 'Too many wrong tokens came from this address; the server is slowing it down. '
        + 'The page tries again by itself.';
    case 'unauthorized':
      return `This server needs an API key: ${err.message}`;
    case 'forbidden':
      return `Not allowed with this token: ${err.message}`;
    case 'gone':
      return `The function has ended: ${err.message}`;
    default:
      return `${err.code}: ${err.message}`;
  }
}

/** Position bookkeeping for one attachment, as positions.py's OutputTracker. */
export class OutputTracker {
  constructor(held = 0) {
    this.held = held;
    this.duplicates = 0;
  }

  /** The frames to show for one wire frame: none, the frame, or a gap then the frame. */
  accept(seq, ch, data) {
    if (!Number.isSafeInteger(seq) || seq < 1 || typeof ch !== 'string') {
      throw new Error(`the server sent a malformed frame [${String(seq)}, ${String(ch)}]`);
    }
    if (seq <= this.held) {
      this.duplicates += 1;
      return [];
    }
    let first = seq;
    if (ch === 'gap') {
      if (!data || !Number.isSafeInteger(data.from) || data.to !== seq) {
        throw new Error(`the server sent a malformed gap frame at seq ${seq}`);
      }
      first = data.from;
    }
    const out = [];
    if (first > this.held + 1) {
      out.push([first - 1, 'gap', {
        from: this.held + 1, to: first - 1, reason: 'missing (the page saw a hole)',
      }]);
      out.push([seq, ch, data]);
    } else if (first <= this.held) {
      out.push([seq, 'gap', { ...data, from: this.held + 1 }]);
    } else {
      out.push([seq, ch, data]);
    }
    this.held = seq;
    return out;
  }
}

export class SessionFollower {
  constructor(token, store, view, location) {
    this.token = token;
    this.store = store;
    this.view = view;
    this.url = serverUrl(location);
    this.tracker = new OutputTracker();
    this.mode = token.startsWith('bto_') ? 'rw' : 'ro';
    this.session = null;
    this.accepted = 0;
    this.pending = new Map();
    this.conn = null;
    this.state = 'idle';
    this.retry = new Retry({ connect: () => this._connect(), show: (st, detail) => this._setState(st, detail),
      view });
    this.stopped = false;
    this.ended = false;
    this.stateVersion = -1;
    this.timer = null;
    this.polling = false;
    this.pollSoon = false;
    this.writes = Promise.resolve();
    this.storeError = null;
    this.stored = 0;
    this.onOnline = () => this._reconnectNow();
    this.onStatus = () => {}; // each status the server answers, for whoever wants it
  }

  /** Shows what the store holds, then connects. */
  async start() {
    const { record, frames } = await this.store.load();
    if (record.localFrom > 1) {
      this._show([record.localFrom - 1, 'gap', {
        from: 1, to: record.localFrom - 1, reason: 'not kept by this browser (too old)',
      }]);
    }
    for (const frame of frames) this._show(frame);
    this.tracker.held = Math.max(record.held, this.tracker.held);
    this.stored = record.held;
    for (const [seq, item] of record.pending) this.pending.set(seq, item);
    window.addEventListener('online', this.onOnline);
    document.addEventListener('visibilitychange', this.onOnline);
    this._connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.retry.stop();
    window.removeEventListener('online', this.onOnline);
    document.removeEventListener('visibilitychange', this.onOnline);
    if (this.conn) this.conn.close();
    this._setState('stopped');
  }

  _setState(state, detail = '') {
    this.state = state;
    this.view.connection(state, detail);
  }

  async _connect() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    this.retry.trying();
    this._setState('connecting');
    const conn = new Connection(this.url, {
      onEvent: (msg) => this._event(conn, msg),
      onClose: (reason) => this._closed(conn, reason),
    });
    this.conn = conn;
    try {
      await conn.open();
      const reply = await conn.request('attach', { token: this.token, from: this.tracker.held + 1 });
      this._attached(conn, reply);
    } catch (err) {
      if (err instanceof ServerError && ['not_found', 'bad_request', 'unauthorized'].includes(err.code)) {
        this._fatal(err);
      } else if (err instanceof ServerError) {
        this.view.notice('connection', 'error', explain(err));
      }
      conn.close(explain(err));
    }
  }

  _attached(conn, reply) {
    if (conn !== this.conn) return;
    this.retry.attached();
    this.session = reply.session;
    this.mode = reply.mode;
    // Attached before the view says so: what listens may send requests at once.
    this._setState('attached');
    this.view.attached({ session: reply.session, mode: reply.mode, state: reply.state,
      tty: reply.tty === true, persistent: this.store.persistent });
    this._inputAccepted(reply.input_seq);
    this.view.input(this.accepted, this.pending.size);
    for (const [seq, item] of [...this.pending].sort((a, b) => a[0] - b[0])) {
      this._sendInput(seq, item);
    }
    this._poll(conn);
  }

  async _poll(conn) {
    if (conn !== this.conn || conn.closed || this.polling) return;
    this.polling = true;
    clearTimeout(this.timer);
    try {
      const st = await conn.request('status', { token: this.token });
      this.view.status(st);
      this.onStatus(st);
      this.view.clearNotice('connection'); // the server answers again
      this.retry.answered();
      if (st.exit) this.ended = true;
      // The server's input seq: a viewer gets no in_ack, and an owner learns of
      // input another owner page sent.
      this._inputAccepted(st.input_seq);
      // An ack lost with an earlier connection: the store has more than the server knows.
      if (this._acks() && Number.isSafeInteger(st.acked_seq) && st.acked_seq < this.stored) {
        conn.send({ op: 'ack', session: this.session, seq: this.stored });
      }
    } catch (err) {
      if (!(err instanceof ServerError)) return; // the connection is gone: a reconnect polls again
      if (err.code === 'not_found') {
        this._fatal(err);
        conn.close(explain(err));
        return;
      }
      this.view.notice('connection', 'error', explain(err));
    } finally {
      this.polling = false;
    }
    const delay = this.pollSoon ? 200 : (this.ended ? POLL_ENDED_MS : POLL_RUNNING_MS);
    this.pollSoon = false;
    this.timer = setTimeout(() => this._poll(conn), delay);
  }

  _closed(conn, reason) {
    if (conn !== this.conn || this.stopped) return;
    clearTimeout(this.timer);
    this.retry.schedule(reason);
  }

  /** The browser is back online or the tab is visible again: reconnect at once if
   * waiting; if attached, ask for status now, which closes a connection that died
   * meanwhile (no reply) instead of trusting it until the next poll times out. */
  _reconnectNow() {
    if (document.hidden) return;
    if (this.state === 'waiting') this.retry.soon();
    else if (this.state === 'attached') this._pollSoon();
  }

  _fatal(err) {
    this.stopped = true;
    clearTimeout(this.timer);
    this.retry.stop();
    let text = explain(err);
    let kind = 'fatal';
    if (err.code === 'not_found' && (this.session !== null || this.tracker.held > 0)) {
      text = 'The server no longer has this session: it was destroyed, or it ended and '
        + 'expired. What the page shows is the copy this browser kept.';
      this.view.ended('gone');
      if (this.view.exitData !== null) kind = 'info';
    } else if (err.code === 'bad_request' && this.tracker.held > 0) {
      text = `The server has fewer frames than this browser already showed (up to seq ${this.tracker.held}): `
        + `its data was reset, or this is another server. (${err.message})`;
    }
    this.view.stopNotice(kind, text);
    this._setState('stopped', text);
  }

  _event(conn, msg) {
    if (conn !== this.conn || msg.session !== this.session) {
      if (msg.ev === 'error') this.view.notice('connection', 'error', explain(asError(msg.error)));
      return;
    }
    switch (msg.ev) {
      case 'out':
        this._frames(conn, Array.isArray(msg.frames) ? msg.frames : []);
        break;
      case 'in_ack':
        this._inputAccepted(msg.seq);
        break;
      case 'state':
        if (Number.isSafeInteger(msg.version) && msg.version > this.stateVersion) {
          this.stateVersion = msg.version;
          this.view.sharedState(msg.version, msg.value);
        }
        break;
      case 'error': {
        // A destroyed session also answers `gone`: the status poll that follows
        // tells (not_found) and stops the page.
        const err = asError(msg.error);
        if (err.code === 'gone' && this.pending.size > 0) {
          this._dropInput(`${this.pending.size} input(s) not delivered: the function had ended`);
        } else {
          // An input's refusal lasts until an input is accepted; any other, until
          // the server answers a status again.
          const topic = INPUT_REFUSALS.includes(err.code) ? 'input' : 'connection';
          this.view.notice(topic, 'error', explain(err));
        }
        if (err.code === 'gone') this._pollSoon();
        break;
      }
      default:
        break;
    }
  }

  _frames(conn, wire) {
    const shown = [];
    try {
      for (const f of wire) {
        if (!Array.isArray(f) || f.length !== 3) throw new Error('the server sent a malformed frame');
        for (const frame of this.tracker.accept(f[0], f[1], f[2])) {
          this._show(frame);
          shown.push(frame);
        }
      }
    } catch (err) {
      this.view.notice('connection', 'error', err.message);
      conn.close(err.message);
      return;
    }
    if (shown.length === 0) return;
    const last = shown[shown.length - 1][0];
    this.writes = this.writes.then(async () => {
      try {
        await this.store.addFrames(shown);
      } catch (err) {
        this.storeError = String(err?.message || err);
        this.view.notice('store', 'error', `this browser could not store frames (${this.storeError}): `
          + 'they are not acknowledged, and a reload shows them again from the server');
        return;
      }
      this.stored = Math.max(this.stored, last);
      if (this._acks() && !conn.closed) conn.send({ op: 'ack', session: this.session, seq: last });
    });
  }

  _pollSoon() {
    if (this.polling) {
      this.pollSoon = true;
    } else if (this.conn && this.state === 'attached') {
      clearTimeout(this.timer);
      const conn = this.conn;
      this.timer = setTimeout(() => this._poll(conn), 200);
    }
  }

  /** An owner page whose store works acknowledges what it stored; no other page does. */
  _acks() {
    return this.mode === 'rw' && this.store.persistent && this.storeError === null;
  }

  _show(frame) {
    this.view.frame(frame[0], frame[1], frame[2]);
    if (frame[1] === 'exit' && !this.ended) {
      this.ended = true;
      this._pollSoon(); // the figures after the end, without waiting for the next poll
    }
  }

  _inputAccepted(seq) {
    if (!Number.isSafeInteger(seq) || seq <= this.accepted) return;
    this.accepted = seq;
    for (const s of [...this.pending.keys()]) if (s <= seq) this.pending.delete(s);
    this.view.input(this.accepted, this.pending.size);
    this.view.clearNotice('input');
    this.store.inputAccepted(seq).catch((err) => this.view.notice('store', 'error', String(err)));
  }

  _dropInput(why) {
    this.pending.clear();
    this.view.input(this.accepted, 0);
    this.view.notice('input', 'error', why);
    this.store.dropInput().catch((err) => this.view.notice('store', 'error', String(err)));
  }

  /** Sends an input value (or `{eof: true}`; `stdin: true` for the function's stdin)
   * exactly once; resolves with its seq. */
  async input(item) {
    if (this.mode !== 'rw') throw new Error('a viewer token cannot send input');
    if (this.session === null) throw new Error('not attached yet');
    const seq = await this.store.addInput(item, this.accepted);
    this.pending.set(seq, item);
    this.view.input(this.accepted, this.pending.size);
    if (this.state === 'attached') this._sendInput(seq, item);
    return seq;
  }

  _sendInput(seq, item) {
    if (seq <= this.accepted) return;
    const msg = { op: 'input', session: this.session, seq };
    if (item.stdin) msg.stdin = true;
    if (item.eof) msg.eof = true;
    else msg.data = item.data;
    this.conn.send(msg);
  }

  /** Sends `signal`, `destroy` or `state_get`-like requests with this page's token. */
  async request(op, fields = {}) {
    if (this.state !== 'attached') {
      throw new ConnectionLost('the page is not connected to the server; it reconnects by itself, '
        + 'and this works again once it has');
    }
    const reply = await this.conn.request(op, { token: this.token, ...fields });
    if (op === 'destroy') {
      await this.store.forget();
      this.stop();
      this.view.stopNotice('fatal', 'Session destroyed: its function was killed and its output deleted.');
      this.view.ended('destroyed');
    }
    return reply;
  }
}

function asError(error) {
  const e = error && typeof error === 'object' ? error : {};
  return new ServerError(String(e.code ?? 'internal'), String(e.message ?? 'unknown error'));
}
