// A steady load like the Immich server's: Node's own fetch (undici: keep-alive connections, reused with idle
// gaps), one URL, never a retry, `concurrency` requests in flight at most. The requests are read as JSON from
// argv: [{kind, entries, image?, text?}]; each answer is checked against `expected` (the same input sent alone).
// Prints one JSON line per request when sent ({sent}) and when done ({done}); stops sending when stdin closes,
// then exits once every request is answered.
//
//   node tests/immichload.mjs <url> <requests.json> <concurrency>
import { readFileSync } from 'node:fs';

const [url, requestsPath, concurrency] = process.argv.slice(2);
const requests = JSON.parse(readFileSync(requestsPath, 'utf8'));
const images = new Map();
let stopping = false;
let next = 0;
process.stdin.on('end', () => { stopping = true; });
process.stdin.resume();

const now = () => performance.timeOrigin + performance.now();
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function form(request) {
  const body = new FormData();
  body.append('entries', JSON.stringify(request.entries));
  if (request.image) {
    if (!images.has(request.image)) images.set(request.image, readFileSync(request.image));
    body.append('image', new Blob([images.get(request.image)]), 'blob');
  }
  if (request.text) body.append('text', request.text);
  return body;
}

function sameAnswer(got, expected) {
  if (JSON.stringify(Object.keys(got).sort()) !== JSON.stringify(Object.keys(expected).sort())) return false;
  for (const [key, value] of Object.entries(expected)) {
    if (key === 'clip') {  // batched with others, a vector may differ in its last bits
      const a = JSON.parse(got.clip), b = JSON.parse(value);
      if (a.length !== b.length || a.some((x, i) => Math.abs(x - b[i]) > 1e-4)) return false;
    } else if (JSON.stringify(got[key]) !== JSON.stringify(value)) return false;
  }
  return true;
}

async function one(request, id) {
  const start = now();
  console.log(JSON.stringify({ sent: id, kind: request.kind, t: start }));
  const record = { done: id, kind: request.kind, start };
  try {
    const res = await fetch(new URL('predict', url), { method: 'POST', body: form(request) });
    record.status = res.status;
    const text = await res.text();
    record.ok = res.status === 200 && (!request.expected || sameAnswer(JSON.parse(text), request.expected));
    if (!record.ok) record.error = text.slice(0, 300);
  } catch (error) {
    record.ok = false;
    record.error = `${error.message}: ${error.cause?.code ?? error.cause?.message ?? ''}`;
  }
  record.end = now();
  console.log(JSON.stringify(record));
}

async function worker(index) {
  let count = 0;
  while (!stopping) {
    const id = next++;
    await one(requests[(id * 7 + index) % requests.length], id);
    count += 1;
    // idle gaps: mostly short, now and then long enough for a connection to sit idle (under undici's 4 s)
    await pause(count % 9 === 0 ? 1500 : (id * 37) % 120);
  }
}

await Promise.all(Array.from({ length: Number(concurrency) }, (_, index) => worker(index)));
