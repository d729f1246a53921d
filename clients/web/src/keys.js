// Typing into a terminal session, as `bento attach -t` does: for an owner, the
// keys typed into the page's terminal go to the function's stdin as they are
// (`input` with `stdin: true`, bytes), and the terminal's window size follows
// the page's (`resize`). The function's terminal does the rest, as a terminal
// would: it echoes, edits lines, turns ctrl-c into SIGINT.
//
// Whether the session runs in a terminal is the attach reply's `tty` (and every
// status's). An owner page takes keys from the attach on, also while the
// session is `starting`: the server keeps stdin input accepted then and writes
// it once the function runs. Keys go through SessionFollower.input, with the
// exactly-once seqs of every other input: typed while disconnected, they wait
// in the store and go after the reconnect. Keys typed while one write to the
// store is under way go together in the next input.
//
// The window size is sent only for a terminal session, only while its function
// runs (`resize` is `gone` before), after each attach and whenever the page's
// terminal changes size: the last owner page to attach or resize sets it.
//
// A viewer's terminal stays read-only, and says so.

import { ConnectionLost, ServerError } from './wire.js';

const utf8 = new TextEncoder();

const ENDED = ['exited', 'failed', 'killed', 'lost'];

export class TerminalKeys {
  /** `caption` is the line under the terminal that says what typing does. */
  constructor(follower, view, caption) {
    this.follower = follower;
    this.view = view;
    this.caption = caption;
    this.tty = null; // null: not known yet (not attached); true: a terminal session; false: not one
    this.running = false;
    this.ended = false;
    this.typed = '';
    this.writing = false;
    this.sizing = false;
    this.sent = null; // the window size the server last accepted on this attachment
    view.terminal.onData((data) => this._typed(data));
    view.terminal.onResize(() => this._resize());
    this._show();
  }

  /** Attached (again): `info` has the attach reply's `state` and `tty`. */
  attached(info) {
    this.tty = info.tty === true;
    this._state(info.state);
    this.sent = null; // another owner page may have set its size meanwhile
    this._resize();
    this._show();
  }

  /** A status of the session (each poll). */
  status(st) {
    if (typeof st.tty === 'boolean') this.tty = st.tty;
    this._state(st.state);
    if (st.exit !== null && st.exit !== undefined) this.ended = true;
    this._resize();
    this._show();
  }

  _state(state) {
    this.running = state === 'running';
    if (ENDED.includes(state)) this.ended = true;
  }

  /** Sends the terminal's size when the server does not have it yet. */
  async _resize() {
    if (this.sizing || !this.tty || !this.running || this.ended || this.follower.mode !== 'rw') return;
    const { rows, cols } = this.view.terminal;
    if (this.sent && this.sent.rows === rows && this.sent.cols === cols) return;
    if (this.follower.state !== 'attached') return; // the next attach sends it
    this.sizing = true;
    let accepted = false;
    try {
      await this.follower.request('resize', { rows, cols });
      this.sent = { rows, cols };
      accepted = true;
    } catch (err) {
      // `gone`: the function just ended, which the next status shows; a lost
      // connection: the next attach sends the size again.
      if (!(err instanceof ConnectionLost) && !(err instanceof ServerError && err.code === 'gone')) {
        this.view.notice('input', 'error', `The terminal's size was not sent: ${err.message}`);
      }
    } finally {
      this.sizing = false;
    }
    if (accepted) this._resize(); // a size that changed meanwhile
  }

  _typed(data) {
    if (!this._takesKeys()) return;
    this.typed += data;
    this._flush();
  }

  async _flush() {
    if (this.writing || !this.typed) return;
    this.writing = true;
    const data = utf8.encode(this.typed);
    this.typed = '';
    try {
      await this.follower.input({ stdin: true, data });
      this.view.clearNotice('input-line');
    } catch (err) {
      this.view.notice('input-line', 'error', `Keys not sent: ${err.message}`);
    } finally {
      this.writing = false;
    }
    this._flush();
  }

  _takesKeys() {
    return this.tty === true && !this.ended && this.follower.mode === 'rw';
  }

  /** The terminal takes keys only when they go somewhere; the caption says what typing does. */
  _show() {
    const takes = this._takesKeys();
    this.view.terminal.options.disableStdin = !takes;
    let text = '';
    if (this.tty === true && this.follower.mode === 'ro') {
      text = 'Read-only terminal: this is a viewer token; keys typed here go nowhere.';
    } else if (takes) {
      text = 'Keys typed here go to the function\'s terminal; its window size follows this one.';
    } else if (this.tty === false && !this.ended) {
      text = 'Output only: this function does not run in a terminal.';
      if (this.follower.mode === 'rw') text += ' The input line sends values for api.recv().';
    }
    this.caption.textContent = text;
    this.caption.hidden = !text;
  }
}
