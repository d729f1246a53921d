// When the page tries to connect again after a drop, and what it tells the
// person meanwhile: offline (the browser says it has no network) or the server
// out of reach, reconnecting by itself, the next try counted down; and, once
// attached again, that it is back.
//
// The tries back off (BACKOFF_MS, then BACKOFF_MAX_MS, each ±25% jitter) and
// start again from the shortest wait only once a connection has answered a
// `status`, so a server that accepts and drops at once is not tried in a tight
// loop. The browser's "online" and "visible" events try at once, but never
// sooner than MIN_SPACING_MS after the last try.

const BACKOFF_MS = [250, 500, 1000, 2000, 4000, 8000];
const BACKOFF_MAX_MS = 10000;
const MIN_SPACING_MS = 1000;
// A drop the first quick retry mends is not worth a notice; one it does not is.
const NOTICE_AFTER_TRIES = 2;
const BACK_NOTICE_MS = 6000;

function clock(ms) {
  return new Date(ms).toTimeString().slice(0, 8);
}

export class Retry {
  /**
   * `connect()` makes one try; `show(state, detail)` sets the connection badge;
   * `view` shows and clears notices (topic 'network').
   */
  constructor({ connect, show, view }) {
    this.connect = connect;
    this.show = show;
    this.view = view;
    this.tries = 0;
    this.timer = null;
    this.ticker = null;
    this.lastTry = 0;
    this.nextAt = 0;
    this.reason = '';
    this.lostAt = 0; // when the connection was lost (0: attached)
    this.said = false; // the notice says the page is away
  }

  /** A connection is starting now. */
  trying() {
    this.lastTry = Date.now();
    this._stopTimers();
  }

  /** The connection was lost or could not be made (`reason`): try again later. */
  schedule(reason) {
    this._stopTimers();
    const delay = Math.min(BACKOFF_MS[this.tries] ?? BACKOFF_MAX_MS, BACKOFF_MAX_MS);
    const jittered = Math.round(delay * (0.75 + Math.random() * 0.5));
    this.tries += 1;
    this.reason = reason;
    if (!this.lostAt) this.lostAt = Date.now();
    this.nextAt = Date.now() + jittered;
    this.timer = setTimeout(() => this.connect(), jittered);
    this.ticker = setInterval(() => this._say(), 1000);
    this._say();
  }

  /** The browser is back online or the tab visible: try now, unless a try just started. */
  soon() {
    if (this.timer === null) return;
    const wait = Math.max(0, this.lastTry + MIN_SPACING_MS - Date.now());
    if (this.nextAt - Date.now() <= wait) return;
    this._stopTimers();
    this.nextAt = Date.now() + wait;
    this.timer = setTimeout(() => this.connect(), wait);
    this.ticker = setInterval(() => this._say(), 1000);
    this._say();
  }

  /** Attached again: says so if the page had said it was away. */
  attached() {
    this._stopTimers();
    const away = Math.round((Date.now() - this.lostAt) / 1000);
    this.lostAt = 0;
    if (!this.said) return;
    this.said = false;
    this.view.notice('network', 'info', `Back online: reconnected at ${clock(Date.now())} after `
      + `${away} s away; the output goes on from where it stopped.`, { forMs: BACK_NOTICE_MS });
  }

  /** A connection answered a status: the next drop starts again from the shortest wait. */
  answered() {
    this.tries = 0;
  }

  stop() {
    this._stopTimers();
    this.view.clearNotice('network');
  }

  _stopTimers() {
    clearTimeout(this.timer);
    clearInterval(this.ticker);
    this.timer = null;
    this.ticker = null;
  }

  /** The badge and, once the drop has outlasted a quick retry, the notice. */
  _say() {
    const secs = Math.max(0, Math.ceil((this.nextAt - Date.now()) / 1000));
    const offline = navigator.onLine === false;
    const next = `next try in ${secs} s (at ${clock(this.nextAt)})`;
    this.show('waiting', `${offline ? 'offline' : this.reason}; retrying in ${secs} s`);
    if (!offline && this.tries < NOTICE_AFTER_TRIES && !this.said) return;
    this.said = true;
    this.view.notice('network', 'warn', offline
      ? `Offline: this browser has no network. The page is reconnecting by itself: ${next}, `
        + 'and at once when the network is back.'
      : `Cannot reach the server (${this.reason}). The page is reconnecting by itself: ${next}.`);
  }
}
