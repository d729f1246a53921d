// What the page shows of one session: stdout and stderr in a terminal (xterm.js
// does the ANSI colours and carriage returns), `msg` frames as values, gaps as
// gaps, the exit, the status figures, the shared state, and the connection.
//
// Every value shown comes from the network or from the function, so nothing is
// ever put into the page as HTML: text only (textContent).

import { FitAddon } from '@xterm/addon-fit';
import { Terminal } from '@xterm/xterm';

const MAX_MESSAGE_ROWS = 5000;
const SUMMARY_CHARS = 160;

/** JSON text of a CBOR value, with what JSON lacks (bytes, big integers, NaN) spelled out. */
export function valueText(value, indent = 0) {
  return JSON.stringify(value, (_key, v) => {
    if (typeof v === 'bigint') return `${v}n`;
    if (typeof v === 'number' && !Number.isFinite(v)) return String(v);
    if (v instanceof Uint8Array) return `<${v.length} bytes: ${hex(v.subarray(0, 32))}${v.length > 32 ? '…' : ''}>`;
    if (v === undefined) return null;
    return v;
  }, indent) ?? 'null';
}

function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function bytesText(n) {
  if (typeof n !== 'number') return String(n ?? '–');
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function timeText(epoch) {
  return typeof epoch === 'number' ? new Date(epoch * 1000).toISOString().replace('T', ' ').slice(0, 19) : '–';
}

/** What a page without storage cannot do, and what to do about it. */
const NO_STORAGE = 'This browser does not let this page store anything (site data is blocked for '
  + 'this server, or this is a private window). The page works, but it keeps the output only '
  + 'while this tab is open: a reload reads it all again from the server, an owner page does '
  + 'not acknowledge output (the server keeps it for the next reader), and input the server '
  + 'has not yet accepted is lost if the tab closes. To keep them, allow this site to store '
  + 'data (the browser\'s site settings: cookies and site data) and reload.';

export class View {
  /** `notices` is the page's Notices (notices.js). */
  constructor(root, notices) {
    this.root = root;
    this.notices = notices;
    this.$ = (id) => root.querySelector(`#${id}`);
    // Keys stay off until keys.js knows they go somewhere (an owner's terminal session).
    this.terminal = new Terminal({
      convertEol: true, disableStdin: true, scrollback: 10000, fontSize: 13,
      fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
      theme: { background: '#14161a', foreground: '#d8dee9' },
    });
    this.fit = new FitAddon();
    this.terminal.loadAddon(this.fit);
    this.terminal.open(this.$('terminal'));
    this.fit.fit();
    window.addEventListener('resize', () => this.fit.fit());
    // The seqs shown, as runs [first, last]: a frame shown twice would start a new run.
    this.runs = [];
    this.lastSeq = 0;
    this.atLineStart = true;
    this.messages = [];
    this.exitData = null;
    this.lastStatus = null;
    this.state = null;
    this.mode = null;
    this.connState = 'idle';
    this.inputFigures = { accepted: 0, pending: 0 };
  }

  // -- frames ---------------------------------------------------------------

  frame(seq, ch, data) {
    const run = this.runs[this.runs.length - 1];
    if (run && run[1] + 1 === seq) run[1] = seq;
    else this.runs.push([seq, seq]);
    this.lastSeq = seq;
    const shown = this.$('shown-seq');
    if (shown) shown.textContent = String(seq);
    if (ch === 'stdout' || ch === 'stderr') {
      const chunk = data instanceof Uint8Array ? data : String(data);
      this.terminal.write(chunk);
      if (chunk.length) this.atLineStart = chunk[chunk.length - 1] === (typeof chunk === 'string' ? '\n' : 10);
    } else if (ch === 'gap') {
      const text = `frames ${data.from}–${data.to} not received: ${data.reason}`;
      this.terminal.write(`${this.atLineStart ? '' : '\r\n'}\x1b[33m── ${text} ──\x1b[0m\r\n`);
      this.atLineStart = true;
      this._messageRow(seq, 'gap', text, null);
    } else if (ch === 'exit') {
      this._exit(data);
    } else {
      this.messages.push({ seq, ch, value: data });
      if (this.messages.length > MAX_MESSAGE_ROWS) this.messages.shift();
      this._messageRow(seq, ch, valueText(data), data);
    }
  }

  _messageRow(seq, ch, summary, value) {
    const list = this.$('messages');
    const short = summary.length > SUMMARY_CHARS ? `${summary.slice(0, SUMMARY_CHARS)}…` : summary;
    const parts = [el('span', { class: 'seq' }, `#${seq}`),
      el('span', { class: `ch ch-${ch.split(':')[0]}` }, ch), el('code', {}, short)];
    const row = value === null
      ? el('li', { class: 'gap' }, ...parts)
      : el('li', {}, el('details', {}, el('summary', {}, ...parts), el('pre', {}, valueText(value, 2))));
    list.append(row);
    while (list.childElementCount > MAX_MESSAGE_ROWS) list.firstElementChild.remove();
    this.$('messages-empty').hidden = true;
    row.scrollIntoView({ block: 'nearest' });
  }

  _exit(data) {
    this.exitData = data;
    this.notices.clear('control'); // the exit says what a signal did
    this.root.dispatchEvent(new CustomEvent('bento-exit', { detail: data }));
    const box = this.$('exit');
    box.replaceChildren();
    box.hidden = false;
    const d = data && typeof data === 'object' ? data : {};
    const parts = [`${d.state}`];
    if (d.code !== null && d.code !== undefined) parts.push(`code ${d.code}`);
    if (d.signal) parts.push(`signal ${d.signal}`);
    box.className = `exit exit-${d.error ? 'error' : d.state}`;
    box.append(el('h3', {}, `Exit: ${parts.join(', ')}`));
    if (d.result !== null && d.result !== undefined) {
      box.append(el('div', {}, 'result: '), el('pre', {}, valueText(d.result, 2)));
    }
    if (d.error && typeof d.error === 'object') {
      box.append(el('div', { class: 'error-line' }, `${d.error.type}: ${d.error.message}`));
      if (d.error.traceback) box.append(el('pre', { class: 'traceback' }, String(d.error.traceback)));
    }
  }

  // -- figures --------------------------------------------------------------

  attached(info) {
    this.mode = info.mode;
    this.$('session-id').textContent = info.session;
    this.$('mode').textContent = info.mode === 'rw' ? 'owner (read-write)' : 'viewer (read-only)';
    this.notices.clear('connection');
    if (!info.persistent) this.notice('storage', 'warn', NO_STORAGE);
    this.root.dispatchEvent(new CustomEvent('bento-attached', { detail: info }));
  }

  status(st) {
    this.lastStatus = st;
    const rows = [
      ['state', st.state], ['first seq', st.first_seq], ['next seq', st.next_seq],
      ['shown up to', this.lastSeq, 'shown-seq'],
      ['acked seq', st.acked_seq], ['input seq', st.input_seq],
      ['buffer', bytesText(st.buffer_bytes)], ['attachments', st.attachments],
      ['sandbox', st.sandbox ?? '–'], ['created', timeText(st.created)], ['ended', timeText(st.ended)],
    ];
    this.$('status').replaceChildren(...rows.flatMap(([k, v, id]) => [
      el('dt', {}, k), el('dd', id ? { id } : {}, String(v ?? '–'))]));
    // An exit frame this page will never get (trimmed before it attached: the
    // last frame, next_seq - 1, is below first_seq) still has its status; one
    // still on its way comes as a frame.
    if (st.exit && this.exitData === null && st.first_seq > st.next_seq - 1) this._exit(st.exit);
    this.ended(String(st.state));
  }

  /** The session's state badge: from a status, or `destroyed` / `gone` when it is no more. */
  ended(state) {
    this.$('state-badge').textContent = state;
    this.$('state-badge').className = `badge state-${state}`;
  }

  sharedState(version, value) {
    this.state = { version, value };
    this.$('shared-version').textContent = `version ${version}`;
    this.$('shared-value').textContent = valueText(value, 2);
  }

  input(accepted, pending) {
    this.inputFigures = { accepted, pending };
    this.$('input-figures').textContent = pending
      ? `${pending} input(s) waiting for the server (sent again after a reconnect)`
      : `server has input up to seq ${accepted}`;
  }

  /** The signals clicked while disconnected, waiting for the connection (signals.js). */
  signalsWaiting(names) {
    this.$('signals-queued-text').textContent = `${names.join(', ')} ${names.length > 1 ? 'wait' : 'waits'} `
      + 'for the connection: sent once the page reconnects, unless the function has ended by then.';
    this.$('signals-queued').hidden = names.length === 0;
  }

  connection(state, detail) {
    this.connState = state;
    const badge = this.$('conn');
    // A stopped page says why in its notice; the badge keeps to one short line.
    // A waiting page's detail says all: why, and when it tries again.
    if (state === 'waiting') badge.textContent = detail;
    else badge.textContent = detail && state !== 'stopped' ? `${state}: ${detail}` : state;
    badge.title = detail;
    badge.className = `badge conn-${state}`;
    if (state === 'stopped' && this.mode === null && this.lastSeq === 0) {
      // Nothing to show of a session that was never reached: back to the start.
      this.$('session').hidden = true;
      this.$('intro').hidden = false;
    }
  }

  /** A notice under `topic` (notices.js): it replaces that topic's last one. */
  notice(topic, kind, text, options) {
    this.notices.set(topic, kind, text, options);
  }

  clearNotice(topic) {
    this.notices.clear(topic);
  }

  /** The page stopped: this notice replaces every other. */
  stopNotice(kind, text) {
    this.notices.clearAll();
    this.notices.set('session', kind, text);
  }

  // -- the test hook (window.bentoPage) reads these --------------------------

  /** Every seq shown, in the order shown. */
  seqs() {
    const out = [];
    for (const [first, last] of this.runs) for (let seq = first; seq <= last; seq += 1) out.push(seq);
    return out;
  }

  /** Every line of the terminal, scrollback included, right-trimmed. */
  terminalText() {
    const buffer = this.terminal.buffer.active;
    const lines = [];
    for (let y = 0; y < buffer.length; y += 1) {
      const line = buffer.getLine(y);
      if (!line) continue;
      if (line.isWrapped && lines.length) lines[lines.length - 1] += line.translateToString(true);
      else lines.push(line.translateToString(true));
    }
    while (lines.length && lines[lines.length - 1] === '') lines.pop();
    return lines.join('\n');
  }

  /** The colour of the first cell of `text` in the terminal, or null where it is not shown. */
  colorOf(text) {
    const buffer = this.terminal.buffer.active;
    for (let y = 0; y < buffer.length; y += 1) {
      const line = buffer.getLine(y);
      const x = line ? line.translateToString(false).indexOf(text) : -1;
      if (x < 0) continue;
      const cell = line.getCell(x);
      return { fg: cell.getFgColor(), palette: cell.isFgPalette(), rgb: cell.isFgRGB(),
        default: cell.isFgDefault(), bold: cell.isBold() !== 0 };
    }
    return null;
  }

  /** Resolves once the terminal has parsed everything written so far. */
  flushed() {
    return new Promise((resolve) => this.terminal.write('', resolve));
  }
}
