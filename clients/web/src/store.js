// What the page keeps in the browser for one session, so a reload, a sleep or a
// closed tab resumes exactly: the frames it has shown (to rebuild the view),
// the highest seq it holds, and the input it sent that the server has not yet
// acknowledged.
//
// Everything is keyed by a hash of the token, never by the token itself. The
// frames and the position move together in one IndexedDB transaction, so after
// any crash the stored frames are exactly the seqs up to the stored position:
// the page asks the server for the seq after it and shows nothing twice.
// Without IndexedDB (a private window that refuses it), MemoryStore keeps the
// same record for the life of the page only, and says so.

import { sha256 } from '@noble/hashes/sha2.js';
import { bytesToHex, utf8ToBytes } from '@noble/hashes/utils.js';

const DB_NAME = 'bento-page';
const DB_VERSION = 1;
// Frames kept per session; beyond it the oldest go, down to TRIM_TO_BYTES (so
// trimming is not paid on every frame), and a reload shows a local gap.
export const KEEP_BYTES = 16 * 1024 * 1024;
export const TRIM_TO_BYTES = (KEEP_BYTES * 3) / 4;

/** The key of a token's records: no one who reads the browser's storage learns the token. */
export function tokenKey(token) {
  return bytesToHex(sha256(utf8ToBytes(`bento-page/v1:${token}`)));
}

/** The bytes a frame takes in the store, as counted against KEEP_BYTES. */
export function frameSize(frame) {
  const data = frame[2];
  if (data instanceof Uint8Array) return data.length + 16;
  return JSON.stringify(data, (_k, v) => (typeof v === 'bigint' ? String(v) : v))?.length ?? 16;
}

function emptyRecord(key) {
  return { key, held: 0, localFrom: 1, bytes: 0, inputLast: 0, pending: [] };
}

function done(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

function finished(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error || new Error('storage transaction aborted'));
  });
}

function openDb() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, DB_VERSION);
    request.onupgradeneeded = () => {
      const db = request.result;
      db.createObjectStore('positions', { keyPath: 'key' });
      db.createObjectStore('frames', { keyPath: ['key', 'seq'] });
    };
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
    request.onblocked = () => reject(new Error('the page\'s storage is held by an older tab'));
  });
}

/** A session's record in IndexedDB. */
export class SessionStore {
  static async open(token) {
    const db = await openDb();
    return new SessionStore(db, tokenKey(token));
  }

  constructor(db, key) {
    this.db = db;
    this.key = key;
    this.persistent = true;
  }

  _range() {
    return IDBKeyRange.bound([this.key, 0], [this.key, Number.MAX_SAFE_INTEGER]);
  }

  /** `{record, frames}`: the position, pending input, and the frames held, in seq order. */
  async load() {
    const tx = this.db.transaction(['positions', 'frames'], 'readonly');
    const record = (await done(tx.objectStore('positions').get(this.key))) || emptyRecord(this.key);
    const rows = await done(tx.objectStore('frames').getAll(this._range()));
    return { record, frames: rows.map((r) => [r.seq, r.ch, r.data]) };
  }

  /**
   * Stores frames (in seq order, each above the position they continue) and moves
   * the position to the last one, in one transaction; trims the oldest beyond
   * KEEP_BYTES. Resolves with the record once it is on disk.
   */
  async addFrames(frames) {
    const tx = this.db.transaction(['positions', 'frames'], 'readwrite');
    const positions = tx.objectStore('positions');
    const store = tx.objectStore('frames');
    const record = (await done(positions.get(this.key))) || emptyRecord(this.key);
    for (const frame of frames) {
      if (frame[0] <= record.held) continue; // another tab of this browser stored it
      store.put({ key: this.key, seq: frame[0], ch: frame[1], data: frame[2] });
      record.bytes += frameSize(frame);
      record.held = frame[0];
    }
    if (record.bytes > KEEP_BYTES) await this._trim(store, record);
    positions.put(record);
    await finished(tx);
    return record;
  }

  async _trim(store, record) {
    const cursor = store.openCursor(this._range());
    await new Promise((resolve, reject) => {
      cursor.onerror = () => reject(cursor.error);
      cursor.onsuccess = () => {
        const c = cursor.result;
        if (!c || record.bytes <= TRIM_TO_BYTES || c.value.seq >= record.held) {
          resolve();
          return;
        }
        record.bytes -= frameSize([c.value.seq, c.value.ch, c.value.data]);
        record.localFrom = c.value.seq + 1;
        c.delete();
        c.continue();
      };
    });
  }

  /**
   * Records a new input before it is sent: resolves with its seq, the next one
   * after both `after` (what the server has accepted) and every seq this browser
   * gave out for the session.
   */
  async addInput(item, after) {
    return this._update((record) => {
      const seq = Math.max(record.inputLast, after) + 1;
      record.inputLast = seq;
      record.pending.push([seq, item]);
      return seq;
    });
  }

  /** The server accepted every input up to `seq`: they are no longer pending. */
  async inputAccepted(seq) {
    return this._update((record) => {
      record.inputLast = Math.max(record.inputLast, seq);
      record.pending = record.pending.filter(([s]) => s > seq);
    });
  }

  /** Forgets every pending input (the function has ended: none can be delivered). */
  async dropInput() {
    return this._update((record) => {
      record.pending = [];
    });
  }

  async _update(change) {
    const tx = this.db.transaction(['positions'], 'readwrite');
    const positions = tx.objectStore('positions');
    const record = (await done(positions.get(this.key))) || emptyRecord(this.key);
    const result = change(record);
    positions.put(record);
    await finished(tx);
    return result;
  }

  /** Forgets the session (destroyed, or the server no longer knows the token). */
  async forget() {
    const tx = this.db.transaction(['positions', 'frames'], 'readwrite');
    tx.objectStore('positions').delete(this.key);
    tx.objectStore('frames').delete(this._range());
    await finished(tx);
  }
}

/** The same record for the life of the page only (no IndexedDB here). */
export class MemoryStore {
  constructor(token) {
    this.key = tokenKey(token);
    this.persistent = false;
    this.record = emptyRecord(this.key);
    this.frames = [];
  }

  async load() {
    return { record: structuredClone(this.record), frames: [...this.frames] };
  }

  async addFrames(frames) {
    for (const frame of frames) {
      if (frame[0] <= this.record.held) continue;
      this.frames.push(frame);
      this.record.bytes += frameSize(frame);
      this.record.held = frame[0];
    }
    if (this.record.bytes > KEEP_BYTES) {
      while (this.record.bytes > TRIM_TO_BYTES && this.frames.length > 1) {
        const old = this.frames.shift();
        this.record.bytes -= frameSize(old);
        this.record.localFrom = old[0] + 1;
      }
    }
    return structuredClone(this.record);
  }

  async addInput(item, after) {
    const seq = Math.max(this.record.inputLast, after) + 1;
    this.record.inputLast = seq;
    this.record.pending.push([seq, item]);
    return seq;
  }

  async inputAccepted(seq) {
    this.record.inputLast = Math.max(this.record.inputLast, seq);
    this.record.pending = this.record.pending.filter(([s]) => s > seq);
  }

  async dropInput() {
    this.record.pending = [];
  }

  async forget() {
    this.record = emptyRecord(this.key);
    this.frames = [];
  }
}

/** The store for a token: IndexedDB where the browser allows it, else memory. */
export async function openStore(token) {
  try {
    return await SessionStore.open(token);
  } catch (err) {
    // The page says in plain words what this costs (render.js); the browser's
    // own words are for whoever debugs it.
    console.warn('bento: IndexedDB refused, keeping this session in memory:', err);
    return new MemoryStore(token);
  }
}
