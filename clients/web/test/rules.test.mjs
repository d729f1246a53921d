// The page's exactly-once rules on plain values, with Node's own test runner:
// the output tracker (duplicates, holes, gaps), the store (IndexedDB through
// fake-indexeddb, and memory): frame bounds, input seqs, two tabs; the wire's
// CBOR, and what errors say.
// Run by tests/web/test_build.py where Node is installed (`node --test test/`).

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { explain, OutputTracker, TOKEN_SHAPE } from '../src/session.js';
import 'fake-indexeddb/auto';

import { KEEP_BYTES, MemoryStore, SessionStore, TRIM_TO_BYTES, tokenKey } from '../src/store.js';
import { decode, encode, ServerError } from '../src/wire.js';

test('frames in order are shown once each; a duplicate is dropped and counted', () => {
  const t = new OutputTracker();
  assert.deepEqual(t.accept(1, 'stdout', 'a'), [[1, 'stdout', 'a']]);
  assert.deepEqual(t.accept(2, 'msg', 5), [[2, 'msg', 5]]);
  assert.deepEqual(t.accept(2, 'msg', 5), []);
  assert.deepEqual(t.accept(1, 'stdout', 'a'), []);
  assert.equal(t.duplicates, 2);
  assert.equal(t.held, 2);
});

test('a hole becomes a gap before the frame that follows it', () => {
  const t = new OutputTracker(3);
  assert.deepEqual(t.accept(7, 'stdout', 'x'), [
    [6, 'gap', { from: 4, to: 6, reason: 'missing (the page saw a hole)' }],
    [7, 'stdout', 'x'],
  ]);
  assert.equal(t.held, 7);
});

test("the server's gap is shown as it is, or only its part above what is held", () => {
  const t = new OutputTracker();
  assert.deepEqual(t.accept(5, 'gap', { from: 1, to: 5, reason: 'dropped' }),
    [[5, 'gap', { from: 1, to: 5, reason: 'dropped' }]]);
  const u = new OutputTracker(3);
  assert.deepEqual(u.accept(9, 'gap', { from: 2, to: 9, reason: 'acked' }),
    [[9, 'gap', { from: 4, to: 9, reason: 'acked' }]]);
  assert.equal(u.held, 9);
});

test('a malformed frame is refused, not shown', () => {
  const t = new OutputTracker();
  assert.throws(() => t.accept(0, 'stdout', 'x'), /malformed frame/);
  assert.throws(() => t.accept('1', 'stdout', 'x'), /malformed frame/);
  assert.throws(() => t.accept(1, 7, 'x'), /malformed frame/);
  assert.throws(() => t.accept(4, 'gap', { from: 1, to: 3 }), /malformed gap/);
  assert.throws(() => t.accept(4, 'gap', null), /malformed gap/);
  assert.equal(t.held, 0);
});

for (const [name, open] of [
  ['memory', async (token) => new MemoryStore(token)],
  ['IndexedDB', async (token) => SessionStore.open(token)],
]) {
  test(`${name}: stored frames skip what is held and keep within the bound, oldest out first`, async () => {
    const store = await open(`bto_frames_${name}`);
    const big = new Uint8Array(KEEP_BYTES / 4);
    await store.addFrames([[1, 'stdout', big], [2, 'stdout', big]]);
    await store.addFrames([[2, 'stdout', big], [3, 'stdout', big], [4, 'stdout', big], [5, 'stdout', big]]);
    const { record, frames } = await store.load();
    assert.equal(record.held, 5);
    // Each frame counts a quarter of the bound and a little more: five are over
    // it, and trimming goes down to TRIM_TO_BYTES, which two fit.
    assert.deepEqual(frames.map((f) => f[0]), [4, 5]);
    assert.equal(record.localFrom, 4);
    assert.ok(record.bytes <= TRIM_TO_BYTES, record.bytes);
    assert.equal(frames[1][2].length, big.length);
  });

  test(`${name}: input seqs go above the server and every seq given out, and leave when accepted`,
    async () => {
      const store = await open(`bto_input_${name}`);
      assert.equal(await store.addInput({ data: 'a' }, 0), 1);
      assert.equal(await store.addInput({ data: 'b' }, 0), 2);
      assert.equal(await store.addInput({ data: 'c' }, 5), 6); // another client sent up to 5
      await store.inputAccepted(2);
      assert.deepEqual((await store.load()).record.pending, [[6, { data: 'c' }]]);
      await store.dropInput();
      assert.deepEqual((await store.load()).record.pending, []);
    });

  test(`${name}: forget leaves nothing of the session`, async () => {
    const store = await open(`bto_forget_${name}`);
    await store.addFrames([[1, 'msg', { a: 1 }]]);
    await store.addInput({ eof: true }, 0);
    await store.forget();
    const { record, frames } = await store.load();
    assert.deepEqual([record.held, record.pending, frames], [0, [], []]);
  });
}

test('two stores of one token (two tabs) share the position and never reuse an input seq', async () => {
  const a = await SessionStore.open('bto_tabs');
  const b = await SessionStore.open('bto_tabs');
  await a.addFrames([[1, 'stdout', 'x'], [2, 'stdout', 'y']]);
  await b.addFrames([[2, 'stdout', 'y'], [3, 'stdout', 'z']]);
  const { record, frames } = await a.load();
  assert.equal(record.held, 3);
  assert.deepEqual(frames.map((f) => f[0]), [1, 2, 3]);
  assert.equal(await a.addInput({ data: 1 }, 0), 1);
  assert.equal(await b.addInput({ data: 2 }, 0), 2);
});

test('records are keyed by a hash of the token, never the token', () => {
  const key = tokenKey('bto_secret');
  assert.match(key, /^[0-9a-f]{64}$/);
  assert.ok(!key.includes('secret'));
  assert.notEqual(key, tokenKey('btv_secret'));
});

test('tokens have the shape of tokens', () => {
  assert.ok(TOKEN_SHAPE.test(`bto_${'A'.repeat(43)}`));
  assert.ok(TOKEN_SHAPE.test(`btv_${'a-_9'.repeat(10)}abc`));
  assert.ok(!TOKEN_SHAPE.test('hello'));
  assert.ok(!TOKEN_SHAPE.test(`bto_${'A'.repeat(43)}&x=1`));
});

test('messages go out as plain CBOR maps: no tags, bytes as bytes', () => {
  const bytes = encode({ op: 'input', session: 's', seq: 1, data: new Uint8Array([1, 2]) });
  const hex = Buffer.from(bytes).toString('hex');
  assert.equal(hex.slice(0, 2), 'a4'); // a map of 4 pairs, its length in the first byte
  assert.ok(hex.includes('420102')); // the bytes as a byte string, untagged
  assert.ok(!/^c|d[89ab]/.test(hex.slice(0, 2)));
  assert.deepEqual(Array.from(decode(bytes).data), [1, 2]);
});

test('errors say what they mean', () => {
  assert.match(explain(new ServerError('not_found', 'no such token')), /does not know that token/);
  assert.match(explain(new ServerError('limit', 'slow down')), /tries again by itself/);
  assert.equal(explain(new ServerError('internal', 'boom')), 'internal: boom');
  assert.equal(explain(new Error('cannot connect')), 'cannot connect');
});
