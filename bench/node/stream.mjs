// An independent client for `make bench`: a stock WebSocket library (`ws`) and
// a stock CBOR codec (`cbor-x`), written from docs/protocol.md alone.
//
//   node stream.mjs bento URL big|small AMOUNT EXECUTE   run a function that streams, ack each event
//   node stream.mjs bare URL big|small AMOUNT             the same bytes from bench/bare_ws.py
//
// EXECUTE is the execute request's fields as JSON (code, args, buffer), given by
// bench/node_client.py so that both clients run the same function.
//
// big: AMOUNT bytes as 64 KiB stdout frames (rate in bytes/s); small: AMOUNT
// 100-byte msg frames (rate in frames/s). The rate runs from the first
// data-carrying message to the last, as bench/client.py's StreamCount does, so
// the two clients' figures compare. Prints one JSON line: {"rate", "total"}.
import WebSocket from "ws";
import { Encoder } from "cbor-x";

const [mode, url, kind, amountText, executeJson] = process.argv.slice(2);
const amount = Number(amountText);
if (!["bento", "bare"].includes(mode) || !["big", "small"].includes(kind) || !(amount > 0)
    || (mode === "bento" && !executeJson)) {
  console.error("usage: node stream.mjs bento|bare URL big|small AMOUNT [EXECUTE]");
  process.exit(2);
}
const FRAME = 65536;
// Plain maps both ways: no cbor-x record extension, which a Bento server refuses.
const cbor = new Encoder({ useRecords: false, mapsAsObjects: true });

const ws = new WebSocket(url, { maxPayload: 64 * 1024 * 1024, perMessageDeflate: false });
ws.binaryType = "nodebuffer";
const send = (msg) => ws.send(cbor.encode(msg));

let total = 0, firstAmount = 0, tFirst = null, tLast = null, lastSeq = 0, sid = null, token = null;
const timer = setTimeout(() => fail("no end within 120 s"), 120_000);

function fail(why) {
  console.error(`stream.mjs: ${why}`);
  process.exit(1);
}

function count(frames) {
  let got = 0, ended = false;
  for (const [seq, ch, data] of frames) {
    lastSeq = seq;
    if (ch === "exit") ended = true;
    else if (kind === "big" && ch === "stdout") got += data.length;
    else if (kind === "small" && ch.startsWith("msg")) got += 1;
  }
  if (got) {
    const t = performance.now();
    if (tFirst === null) { tFirst = t; firstAmount = got; }
    tLast = t;
    total += got;
  }
  return ended;
}

function finish() {
  clearTimeout(timer);
  if (tFirst === null || tLast <= tFirst) fail("too little data for a rate");
  console.log(JSON.stringify({ rate: (total - firstAmount) / ((tLast - tFirst) / 1000), total }));
  ws.close();
}

ws.on("open", () => {
  if (mode === "bare") {
    send(kind === "big" ? { op: "stream", size: FRAME, count: Math.floor(amount / FRAME) }
                        : { op: "records", size: 100, batch: 64, count: amount });
  } else {
    send({ op: "hello", id: 0, proto: 1, client: "bench-node/1" });
  }
});

ws.on("message", (raw) => {
  const msg = cbor.decode(raw);
  if (mode === "bare") {
    if (msg.ev === "done") finish();
    else if (msg.ev === "out") { count(msg.frames); send({ op: "ack", session: msg.session, seq: lastSeq }); }
    return;
  }
  if (msg.id === 0) {
    if (!msg.ok) fail(`hello refused: ${JSON.stringify(msg.error)}`);
    send({ op: "execute", id: 1, ...JSON.parse(executeJson) });
  } else if (msg.id === 1) {
    if (!msg.ok) fail(`execute refused: ${JSON.stringify(msg.error)}`);
    sid = msg.session;
    token = msg.token;
  } else if (msg.id === 2) {
    finish();
  } else if (token === null) {
    // Ended: only the destroy's reply matters (the attachment's end comes first).
  } else if (msg.ev === "error") {
    fail(`error event: ${JSON.stringify(msg.error)}`);
  } else if (msg.ev === "out" && msg.session === sid) {
    const ended = count(msg.frames);
    send({ op: "ack", session: sid, seq: lastSeq });
    if (ended) {
      send({ op: "destroy", id: 2, token });
      token = null;
    }
  }
});
ws.on("error", (err) => fail(err.message));
