// A foreign client: grpc-js with the .proto loaded at run time, as an integrator outside Python would write it.
// Usage: node conformance.js PORT PROTO_ROOT. Prints one JSON report; tests/test_conformance_node.py judges it.
'use strict';
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const [port, protoRoot] = process.argv.slice(2);
const definition = loader.loadSync(`${protoRoot}/musicgen/v1/musicgen.proto`, {
  includeDirs: [protoRoot], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
});
const MusicGen = grpc.loadPackageDefinition(definition).musicgen.v1.MusicGen;
const client = new MusicGen(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const modelInfo = () => new Promise((resolve, reject) =>
  client.GetModelInfo({}, (error, info) => (error ? reject(error) : resolve(info))));

// Run one Session: send `first`, then let `onEvent(event, call)` steer. Resolves with the events and status.
function session(first, onEvent = () => {}) {
  return new Promise((resolve) => {
    const call = client.Session({ deadline: Date.now() + 30000 });
    const events = [];
    call.on('data', (event) => { events.push(event); onEvent(event, call); });
    call.on('error', (error) => resolve({ events, code: error.code, details: error.details }));
    call.on('status', (status) => { if (status.code === grpc.status.OK) resolve({ events, code: 0, details: '' }); });
    if (first !== null) call.write(first);
  });
}

const ackEach = (event, call) => {
  if (event.event === 'audio') {
    const end = (BigInt(event.audio.start_sample) + BigInt(event.audio.sample_count)).toString();
    call.write({ ack: { samples_played: end } });
  }
  if (event.event === 'finished') call.end(); // half-close at once: the OK status follows without a wait
};

function numbering(events, info) {
  const chunks = events.filter((e) => e.event === 'audio').map((e) => e.audio);
  const started = events[0].started;
  let sample = 0n; let frame = 0n; let ok = true; const problems = [];
  chunks.forEach((chunk, index) => {
    const check = (condition, what) => { if (!condition) { ok = false; problems.push(`chunk ${index}: ${what}`); } };
    check(BigInt(chunk.sequence) === BigInt(index), 'sequence');
    check(BigInt(chunk.start_sample) === sample, 'start_sample');
    check(BigInt(chunk.first_frame) === frame, 'first_frame');
    check(chunk.sample_count === chunk.frame_count * started.samples_per_frame, 'sample_count');
    check(chunk.pcm.length === chunk.sample_count * 4 * started.output.channels, 'pcm bytes');
    check(chunk.codes.length === chunk.frame_count * info.num_codebooks, 'codes');
    sample += BigInt(chunk.sample_count); frame += BigInt(chunk.frame_count);
  });
  const finished = events[events.length - 1].finished;
  return { ok, problems, chunks: chunks.length, totalsMatch: finished !== undefined &&
    BigInt(finished.total_samples) === sample && BigInt(finished.total_frames) === frame };
}

async function main() {
  const report = {};
  const info = await modelInfo();
  report.info = { sample_rate: info.sample_rate, num_codebooks: info.num_codebooks, dtype: info.dtype,
    stall_timeout_seconds: info.stall_timeout_seconds, max_duration_seconds: info.max_duration_seconds };

  const lifecycle = await session({ start: { prompt: 'warm lofi beat', duration_frames: '20', chunk_frames: 2,
    max_lead_seconds: 0.3, return_codes: true } }, ackEach);
  const kinds = lifecycle.events.map((e) => e.event);
  const seed = lifecycle.events[0].started.sampling.seed;
  report.lifecycle = { code: lifecycle.code, first: kinds[0], last: kinds[kinds.length - 1],
    reason: lifecycle.events[kinds.length - 1].finished.reason, numbering: numbering(lifecycle.events, info),
    seedExactAsNumber: String(Number(seed)) === seed };

  let audio = 0;
  const stopped = await session({ start: { prompt: 'x', max_lead_seconds: 0.3 } }, (event, call) => {
    ackEach(event, call);
    if (event.event === 'audio' && ++audio === 3) call.write({ stop: {} });
  });
  report.stop = { code: stopped.code, reason: stopped.events[stopped.events.length - 1].finished.reason };

  const errors = {
    topKMinusOne: await session({ start: { sampling: { top_k: -1 } } }), // wraps to 4294967295 on the wire
    firstNotStart: await session({ ack: { samples_played: '0' } }),
    emptyFirst: await session({}),
  };
  report.errors = Object.fromEntries(Object.entries(errors).map(([name, r]) => [name,
    { code: r.code, details: r.details, events: r.events.length }]));

  // Write start and cancel in the same tick: grpc-js never tells the server, which must free it by itself.
  for (let i = 0; i < 3; i++) {
    const call = client.Session();
    call.on('error', () => {});
    call.write({ start: { prompt: 'warm lofi beat' } });
    call.cancel();
  }
  const began = Date.now();
  let most = 0; let active = 0;
  do {
    await sleep(50);
    active = (await modelInfo()).active_sessions;
    most = Math.max(most, active);
  } while ((active > 0 || (most === 0 && Date.now() - began < 3000)) && Date.now() - began < 15000);
  report.cancelInSameTick = { mostActive: most, active, seconds: (Date.now() - began) / 1000 };

  console.log(JSON.stringify(report));
  process.exit(0);
}

main().catch((error) => { console.error(error); process.exit(1); });
