// The Bento page: reads the token from the URL fragment (#t=<token>, never a
// query, so it reaches no server log and no Referer), follows that session, and
// wires the forms: open a token, send input, signal, destroy, run a function.
//
// `window.bentoPage` is a read-only hook for tests and curious people: what the
// page shows, read from the terminal's buffer and the page's own records.

import '@xterm/xterm/css/xterm.css';
import './app.css';

import { TerminalKeys } from './keys.js';
import { Notices } from './notices.js';
import { View } from './render.js';
import { explain, SessionFollower, TOKEN_SHAPE } from './session.js';
import { Signals } from './signals.js';
import { openStore } from './store.js';
import { Connection, serverUrl } from './wire.js';

const $ = (id) => document.getElementById(id);

function fragment() {
  return new URLSearchParams(window.location.hash.slice(1));
}

/** A fresh idempotency key for `execute`: a Run whose reply was lost, clicked
 * again with the same form, gets the same session back instead of a second one. */
function newRunKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `bento-web-${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`;
}

const VIEWER_WHY = 'This is a viewer token: it can watch, not send input, signals or destroy. '
  + 'The session\'s owner token (bto_…) can.';

/** Enables what the token and the session's state allow, and says why the rest is off. */
function setControls(mode, ended) {
  const why = {
    rw: ended ? 'The function has ended: it takes no more input or signals.' : '',
    ro: VIEWER_WHY,
    destroyed: 'The session was destroyed.',
  }[mode] ?? 'Connecting…';
  for (const node of $('controls').querySelectorAll('input, button')) {
    node.disabled = mode !== 'rw' || (ended && node.id !== 'destroy');
  }
  $('controls-why').textContent = why;
  $('controls-why').hidden = !why;
}

async function follow(token, viewerToken, notices) {
  $('intro').hidden = true;
  $('session').hidden = false;
  const view = new View(document.body, notices);
  const store = await openStore(token);
  const follower = new SessionFollower(token, store, view, window.location);
  const signals = new Signals(follower, view, explain);
  const keys = new TerminalKeys(follower, view, $('terminal-why'));
  follower.onStatus = (st) => keys.status(st);
  let mode = token.startsWith('btv_') ? 'ro' : null;
  setControls(mode, false);
  document.body.addEventListener('bento-exit', () => setControls(mode, true));
  document.body.addEventListener('bento-attached', (ev) => {
    mode = ev.detail.mode;
    setControls(mode, view.exitData !== null);
    signals.attached(ev.detail.state);
    keys.attached(ev.detail);
    if (mode === 'rw' && viewerToken && TOKEN_SHAPE.test(viewerToken)) {
      const url = new URL(window.location.href);
      url.hash = `t=${viewerToken}`;
      $('viewer-link').value = url.href;
      $('share').hidden = false;
    }
  });
  wireControls(follower, view, signals);
  window.bentoPage = hook(view, follower, keys);
  await follower.start();
}

function wireControls(follower, view, signals) {
  // An action's error shows under its topic until the next one of its kind succeeds.
  const act = (topic, promise, done, failed = '') => promise.then((value) => {
    view.clearNotice(topic);
    done(value);
  }, (err) => view.notice(topic, 'error', `${failed}${explain(err)}`));
  $('input-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = $('input-line').value;
    let data = text;
    if ($('input-json').checked) {
      try {
        data = JSON.parse(text);
      } catch (err) {
        view.notice('input-line', 'error', `Not JSON: ${err.message}. Untick JSON to send the line as text.`);
        return;
      }
    }
    act('input-line', follower.input({ data }), () => { $('input-line').value = ''; });
  });
  // An error about the line's text goes once that text is edited.
  for (const id of ['input-line', 'input-json']) {
    $(id).addEventListener('input', () => view.clearNotice('input-line'));
  }
  $('eof').addEventListener('click', () => act('input-line', follower.input({ eof: true }), () => {}));
  for (const button of $('controls').querySelectorAll('[data-signal]')) {
    const { signal } = button.dataset;
    button.addEventListener('click', () => signals.click(signal));
  }
  $('signals-cancel').addEventListener('click', () => signals.cancel());
  $('destroy').addEventListener('click', () => {
    if (!window.confirm('Destroy this session? Its function is killed and its output deleted.')) return;
    act('control', follower.request('destroy'), () => setControls('destroyed', true), 'Not destroyed: ');
  });
}

function hook(view, follower, keys) {
  return Object.freeze({
    connection: () => follower.state,
    mode: () => view.mode,
    terminalText: () => view.terminalText(),
    colorOf: (text) => view.colorOf(text),
    flushed: () => view.flushed(),
    seqs: () => view.seqs(),
    held: () => follower.tracker.held,
    duplicates: () => follower.tracker.duplicates,
    messages: () => view.messages.map((m) => ({ seq: m.seq, ch: m.ch, value: JSON.parse(JSON.stringify(m.value, (_k, v) => (typeof v === 'bigint' ? String(v) : v))) })),
    exit: () => view.exitData,
    status: () => view.lastStatus,
    sharedState: () => view.state,
    notice: () => view.notices.text(),
    input: () => ({ ...view.inputFigures }),
    persistent: () => follower.store.persistent,
    tty: () => ({ known: keys.tty, rows: view.terminal.rows, cols: view.terminal.cols, sent: keys.sent }),
  });
}

function wireRun() {
  let runKey = newRunKey();
  $('run-form').addEventListener('input', () => { runKey = newRunKey(); });
  $('run-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const out = $('run-result');
    let args;
    let kwargs;
    try {
      args = JSON.parse($('run-args').value || '[]');
      kwargs = JSON.parse($('run-kwargs').value || '{}');
      if (!Array.isArray(args)) throw new Error('args must be a JSON list');
      if (kwargs === null || typeof kwargs !== 'object' || Array.isArray(kwargs)) {
        throw new Error('kwargs must be a JSON object');
      }
    } catch (err) {
      out.textContent = `Not run: ${err.message}`;
      return;
    }
    out.textContent = 'Starting…';
    const conn = new Connection(serverUrl(window.location), { onEvent: () => {}, onClose: () => {} });
    try {
      await conn.open($('run-key').value.trim() || undefined);
      const reply = await conn.request('execute', {
        code: $('run-code').value, entry: $('run-entry').value.trim() || 'main', args, kwargs,
        attach: false, idempotency_key: runKey,
      });
      window.location.hash = `t=${reply.token}&v=${reply.viewer_token}`;
    } catch (err) {
      out.textContent = `Not run: ${explain(err)}`;
    } finally {
      conn.close();
    }
  });
}

function wireTokenForm() {
  $('token-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = $('token-input').value.trim();
    $('token-input').value = '';
    // A page's own link (a Share link) works as well as its token.
    const link = text.match(/#(t=.*)$/);
    if (link) window.location.hash = link[1];
    else if (text) window.location.hash = `t=${text}`;
  });
}

function main() {
  const notices = new Notices($('notice'));
  const notice = (kind, text) => notices.set('page', kind, text);
  wireTokenForm();
  wireRun();
  // A new fragment is a new session: start again from a clean page.
  window.addEventListener('hashchange', () => window.location.reload());
  const params = fragment();
  const token = (params.get('t') || '').trim();
  if (!token) return;
  if (!TOKEN_SHAPE.test(token)) {
    notice('fatal', 'That is not a Bento token: a token starts with bto_ (owner) or btv_ '
      + '(viewer), followed by 43 letters, digits, - or _. Check that the link was copied whole.');
    return;
  }
  follow(token, params.get('v'), notices).catch((err) => notice('fatal', `The page failed: ${err.message}`));
}

main();
