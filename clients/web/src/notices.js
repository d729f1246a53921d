// The page's notices: what went wrong, or what just happened, each under a
// topic, so that a notice goes when its cause does. A topic holds one notice
// at a time: a new one replaces the old (the next try of an action says how
// that one went), and whoever knows the cause is gone clears its topic (an
// input accepted clears the input's refusal, an attach the connection's
// trouble). A confirmation (`forMs`) goes by itself: it reports a moment.
//
// Topics: 'page' (the token, the page itself), 'session' (the page stopped:
// it replaces every other notice), 'connection', 'storage' (no IndexedDB),
// 'store' (a write that failed), 'input' (the server refused an input),
// 'input-line' (what is typed in the input line), 'control' (signals,
// destroy: the exit clears it), 'signals' (a signal that waited for the
// connection and was not sent), 'network' (offline, reconnecting, back).

const SEVERITY = ['info', 'warn', 'error', 'fatal'];

export class Notices {
  constructor(box) {
    this.box = box;
    this.items = new Map();
    this.timers = new Map();
  }

  /** Shows `text` under `topic` (kind: fatal, error, warn, info), in place of its last notice. */
  set(topic, kind, text, { forMs = 0 } = {}) {
    this._forget(topic);
    this.items.set(topic, { kind, text });
    if (forMs > 0) this.timers.set(topic, setTimeout(() => this.clear(topic), forMs));
    this._render();
  }

  /** The cause of `topic`'s notice is gone: so is the notice. */
  clear(topic) {
    if (!this.items.has(topic)) return;
    this._forget(topic);
    this._render();
  }

  /** Every notice goes (the page stopped: what they said no longer matters). */
  clearAll() {
    for (const topic of [...this.items.keys()]) this._forget(topic);
    this._render();
  }

  has(topic) {
    return this.items.has(topic);
  }

  /** The notices shown, one a line, in the order they came. */
  text() {
    return [...this.items.values()].map((item) => item.text).join('\n');
  }

  _forget(topic) {
    clearTimeout(this.timers.get(topic));
    this.timers.delete(topic);
    this.items.delete(topic);
  }

  _render() {
    const items = [...this.items.values()];
    const worst = items.reduce((w, item) => Math.max(w, SEVERITY.indexOf(item.kind)), 0);
    this.box.replaceChildren(...items.map((item) => {
      const line = document.createElement('div');
      line.className = `notice-line notice-line-${item.kind}`;
      line.textContent = item.text;
      return line;
    }));
    this.box.className = `notice notice-${SEVERITY[worst]}`;
    this.box.hidden = items.length === 0;
  }
}
