// Typing into a terminal session, as `bento attach -t` does: for an owner, the
// keys typed into the page's terminal go to the function's stdin as they are
// (`input` with `stdin: true`, bytes), and the terminal's window size follows
// the page's (`resize`). The function's terminal does the rest, as a terminal
// would: it echoes, edits lines, turns ctrl-c into SIGINT.
//
// The protocol does not say whether a session runs in a terminal; `resize`
// does: it is `gone` for a running function without one. So an owner page
// sends its terminal's size once the function runs, and takes keys only once
// that was accepted. Keys go through SessionFollower.input, with the exactly-
// once seqs of every other input: typed while disconnected, they wait in the
// store and go after the reconnect. Keys typed while one write to the store is
// under way go together in the next input.
//
// A viewer's terminal stays read-only, and says so.

import { ConnectionLost, ServerError } from './wire.js';

const utf8 = new TextEncoder();

export class TerminalKeys {
  /** `caption` is the line under the terminal that says what typing does. */
  constructor(follower, view, caption) {
    this.follower = follower;
    this.view = view;
    this.caption = caption;
    this.tty = null; // null: not known yet; true: a terminal session; false: not one
    this.probing = false;
    this.ended = false;
    this.typed = '';
    this.writing = false;
    this.sizing = false;
    this.sent = null; // the window size the server last accepted
    view.terminal.onData((data) => this._typed(data));
    view.terminal.onResize(() => this._resize());
    this._show();
  }

  /** A status of the session (each poll). */
  status(st) {
    this.ended = st.exit !== null && st.exit !== undefined;
    if (this.follower.mode === 'rw' && !this.ended && this.tty === null && st.state === 'running') {
      this._resize();
    }
    this._show();
  }

  /** Sends the terminal's size when it changed; the first accepted one says this is a terminal. */
  async _resize() {
    if (this.sizing || this.ended || this.tty === false || this.follower.mode !== 'rw') return;
    const { rows, cols } = this.view.terminal;
    if (this.sent && this.sent.rows === rows && this.sent.cols === cols) return;
    if (this.follower.state !== 'attached') return; // the next status after the reconnect sends it
    this.sizing = true;
    try {
      await this.follower.request('resize', { rows, cols });
      this.sent = { rows, cols };
      this.tty = true;
    } catch (err) {
      if (err instanceof ServerError && err.code === 'gone') {
        // No terminal, or the function just ended: the next status tells which.
        if (this.tty === null) this.tty = false;
      } else if (!(err instanceof ConnectionLost)) {
        this.view.notice('input', 'error', `The terminal's size was not sent: ${err.message}`);
      }
    } finally {
      this.sizing = false;
    }
    this._show();
    this._resize(); // a size that changed meanwhile
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
    if (this.follower.mode === 'ro') {
      text = 'Read-only: this is a viewer token, keys typed here go nowhere.';
    } else if (takes) {
      text = 'Keys typed here go to the function\'s terminal; its window size follows this one.';
    } else if (this.tty === false && !this.ended) {
      text = 'Output only: this function does not run in a terminal. The input line sends values '
        + 'for api.recv().';
    }
    this.caption.textContent = text;
    this.caption.hidden = !text;
  }
}
