// The owner's signals (INT, TERM, KILL). Connected, a signal goes at once.
// Clicked while the page is disconnected, it waits for the connection (the
// page shows it, with Cancel) and goes right after the next attach, but only
// if the function still runs then: a signal for a function that has ended
// meanwhile is dropped, with a notice. Each signal waits at most once
// (clicking INT twice while away sends one INT).
//
// At most once: a signal has no seq the server could de-duplicate (INT twice
// is two KeyboardInterrupts), so one whose reply was lost with the connection
// is not sent again; the page says it may not have arrived.

import { ServerError } from './wire.js';

const ENDED = ['exited', 'failed', 'killed', 'lost'];
// A confirmation of a signal stays this long, then goes by itself.
const CONFIRM_MS = 6000;

export class Signals {
  /** `follower` sends requests; `view` shows notices and what waits; `explain` words errors. */
  constructor(follower, view, explain) {
    this.follower = follower;
    this.view = view;
    this.explain = explain;
    this.waiting = [];
  }

  /** The button for `name` was clicked. */
  click(name) {
    if (this.follower.state === 'attached') {
      this._send(name, '');
    } else if (!this.waiting.includes(name)) {
      this.waiting.push(name);
      this.view.signalsWaiting(this.waiting);
    }
  }

  cancel() {
    this.waiting = [];
    this.view.signalsWaiting(this.waiting);
  }

  /** Attached again, the session in `state`: what waited goes now, if it still can. */
  attached(state) {
    if (this.waiting.length === 0) return;
    const names = this.waiting;
    this.cancel();
    if (ENDED.includes(state)) {
      // Not under 'control', which the exit clears: this is news the exit does not tell.
      this.view.notice('signals', 'info', `${names.join(', ')} not sent: the function ended `
        + 'while the page was disconnected.');
      return;
    }
    for (const name of names) this._send(name, ' (it waited for the connection)');
  }

  async _send(name, note) {
    try {
      await this.follower.request('signal', { signal: name });
      this.view.clearNotice('signals');
      // The function's exit may come before the reply (it ended at the signal): it
      // says what the signal did, and a confirmation after it would outlive it.
      if (this.view.exitData !== null) return;
      this.view.notice('control', 'info', `Sent ${name}${note}.`, { forMs: CONFIRM_MS });
    } catch (err) {
      const text = err instanceof ServerError
        ? `${name} not sent: ${this.explain(err)}`
        : `${name} may not have arrived: the connection dropped before the server answered `
          + `(${err.message}). Click it again to send another.`;
      this.view.notice('control', 'error', text);
    }
  }
}
