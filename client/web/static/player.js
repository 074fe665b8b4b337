// The browser player: prompt rows, transport, the WebSocket to the gateway, the AudioWorklet jitter buffer,
// live figures and a scrolling waveform. Protocol: protos/README.md ("Browser player").
//
// Everything the page knows is in `state`, also exposed as window.musicgen.state for tests and the console.

const REPORT_EVERY_FRAMES = 1024; // the worklet reports (and the page acks) every 1024 frames: 32 ms at 32 kHz
const START_FILL_SECONDS = 0.2; // buffered before playback starts, at most half the lead (as the native Player)
const SPARE_BUFFER_SECONDS = 2; // ring room beyond the lead and two chunks
const INSTANT_ROLLBACK_SECONDS = 0.15; // "instant": a change lands this long after what has played
const AUDIO_HEADER_BYTES = 16; // int64 start_sample, uint32 channels, uint32 reserved; then float32 PCM

const state = {
  connected: false, hello: null, error: null, errors: [],
  phase: "idle", // idle | starting | playing | paused | stopping | finished
  sessionId: null, sampleRate: 0, channels: 1, firstSample: 0, leadSeconds: 0, chunkSamples: 0,
  samplesReceived: 0, samplesPlayed: 0, samplesAcked: 0, acksSent: 0,
  maxAheadSamples: 0, // the most that received audio ever ran ahead of what was played
  bufferedSamples: 0, underruns: 0, underrunFrames: 0, retractions: 0, retractedLateFrames: 0, peak: 0,
  latencyMs: null, steerLatencyMs: null, realtimeFactor: 0, gatewayAcks: 0, gatewaySamplesAcked: 0,
  playingPrompts: null, playingRevision: -1, appliedRevisions: [], notices: [], finished: null, audioState: "none",
};
window.musicgen = { state, socket: null };

const $ = (id) => document.getElementById(id);
let socket = null;
let context = null; // AudioContext at the model's rate, so worklet frames are stream samples
let node = null; // the session's AudioWorkletNode
let chunkStarts = []; // [{start, prompts, revision}] received, not yet reached by playback
let steer = null; // {sentAt, sample}: the last prompt change, until its first sample is played
const waveform = { lows: [], highs: [], marks: [] };

// -- prompt rows ----------------------------------------------------------------------------------------------

function buildPromptRows(count) {
  const first = document.querySelector(".prompt-row");
  for (let index = 1; index < count; index++) {
    const row = first.cloneNode(true);
    const [text, weight, value] = [row.querySelector(".prompt-text"), row.querySelector(".prompt-weight"),
      row.querySelector(".weight-value")];
    text.id = `prompt-${index}`; text.value = ""; text.placeholder = `blend with… (optional)`;
    text.setAttribute("aria-label", `prompt ${index + 1}`);
    weight.id = `weight-${index}`; weight.value = "0.5"; weight.setAttribute("aria-label", `weight ${index + 1}`);
    value.htmlFor = weight.id; value.textContent = "0.50";
    first.parentElement.appendChild(row);
  }
  for (const row of document.querySelectorAll(".prompt-row")) {
    const weight = row.querySelector(".prompt-weight");
    const shown = row.querySelector(".weight-value");
    weight.addEventListener("input", () => { shown.textContent = Number(weight.value).toFixed(2); });
    weight.addEventListener("change", () => { if (isLive()) applyPrompts(); });
    row.querySelector(".prompt-text").addEventListener("keydown", (event) => {
      if (event.key === "Enter") (isLive() ? applyPrompts : play)();
    });
  }
}

function collectPrompts() {
  const prompts = [];
  for (const row of document.querySelectorAll(".prompt-row")) {
    const text = row.querySelector(".prompt-text").value.trim();
    const weight = Number(row.querySelector(".prompt-weight").value);
    if (text && !prompts.some((p) => p.text === text)) prompts.push({ text, weight });
  }
  if (!prompts.length) return [{ text: "", weight: 1 }]; // no text: unconditional
  if (!prompts.some((p) => p.weight > 0)) prompts[0].weight = 1;
  return prompts;
}

const describePrompts = (prompts) =>
  prompts.map(([text, weight]) => `${text || "(unconditional)"} ${Math.round(weight * 100)}%`).join(" · ");

// -- the WebSocket ----------------------------------------------------------------------------------------------

function connect() {
  socket = new WebSocket(`ws://${location.host}/ws`);
  socket.binaryType = "arraybuffer";
  window.musicgen.socket = socket;
  socket.onopen = () => { state.connected = true; badge("connected", "ok"); };
  socket.onclose = () => {
    state.connected = false; badge("disconnected: reload to reconnect", "bad");
    if (isLive()) finishPlayback("gateway connection closed");
  };
  socket.onmessage = (event) =>
    (typeof event.data === "string" ? onMessage(JSON.parse(event.data)) : onAudio(event.data));
}

function send(message) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

const HANDLERS = {
  hello(message) {
    state.hello = message;
    $("model").textContent =
      `${message.model} · ${message.sample_rate} Hz · ${message.channels} ch · ${message.server}`;
    setButtons();
  },
  started(message) {
    Object.assign(state, {
      phase: "playing", sessionId: message.session_id, sampleRate: message.sample_rate, channels: message.channels,
      firstSample: message.first_sample, leadSeconds: message.max_lead_seconds, chunkSamples: message.chunk_samples,
      samplesReceived: message.first_sample, samplesPlayed: message.first_sample, samplesAcked: message.first_sample,
      maxAheadSamples: 0, acksSent: 0, underruns: 0, underrunFrames: 0, retractions: 0, retractedLateFrames: 0,
      finished: null, playingPrompts: message.prompts, appliedRevisions: [], notices: [], steerLatencyMs: null,
    });
    showPlaying(message.prompts, 0);
    createNode(message);
    logLine(`started ${message.session_id}: lead ${message.max_lead_seconds} s, ` +
      `chunk ${message.chunk_samples} samples`);
    setButtons();
  },
  chunk(message) {
    state.realtimeFactor = message.realtime_factor;
    state.gatewayAcks = message.acks;
    state.gatewaySamplesAcked = message.samples_acked;
    chunkStarts.push({ start: message.start_sample, prompts: message.prompts, revision: message.prompt_revision });
  },
  notice(message) {
    logLine(`${message.kind} at sample ${message.sample} (revision ${message.prompt_revision}) ${message.message}`);
    state.notices.push(message.kind);
    if (message.kind === "prompt_applied") {
      state.appliedRevisions.push(message.prompt_revision);
      if (steer) steer.sample = message.sample;
    }
    if (message.kind === "paused" || message.kind === "resumed") {
      post({ type: "idle", idle: message.kind === "paused" });
    }
  },
  retracted(message) {
    state.retractions++;
    chunkStarts = chunkStarts.filter((chunk) => chunk.start < message.sample);
    state.samplesReceived = Math.min(state.samplesReceived, message.sample);
    post({ type: "retract", sample: message.sample });
    logLine(`retracted from sample ${message.sample}`);
  },
  finished(message) {
    state.finished = message;
    post({ type: "end" });
    const seconds = (message.total_samples / state.sampleRate).toFixed(1);
    finishPlayback(`finished: ${message.reason} after ${seconds} s ${message.message}`);
  },
  error(message) {
    state.error = message.message;
    state.errors.push(message.message);
    logLine(message.message, "error");
    if (state.phase === "starting") { state.phase = "idle"; setButtons(); }
  },
};

function onMessage(message) {
  const handler = HANDLERS[message.type];
  if (handler) handler(message);
}

function onAudio(buffer) {
  if (!node || state.phase === "stopping") return; // stop: what is still in flight is not played
  const header = new DataView(buffer, 0, AUDIO_HEADER_BYTES);
  const start = Number(header.getBigInt64(0, true));
  const channels = header.getUint32(8, true);
  const pcm = new Float32Array(buffer, AUDIO_HEADER_BYTES);
  const end = start + pcm.length / channels;
  node.port.postMessage({ type: "chunk", start, pcm }, [buffer]);
  state.samplesReceived = Math.max(state.samplesReceived, end);
  state.maxAheadSamples = Math.max(state.maxAheadSamples, state.samplesReceived - state.samplesPlayed);
}

// -- audio --------------------------------------------------------------------------------------------------------

async function ensureContext() {
  const rate = state.hello.sample_rate;
  if (context && context.sampleRate === rate) { await context.resume(); return; }
  context = new AudioContext({ sampleRate: rate }); // the browser resamples to the device if it must
  context.onstatechange = () => { state.audioState = context.state; };
  await context.audioWorklet.addModule("/static/worklet.js");
  await context.resume();
  state.audioState = context.state;
}

function createNode(started) {
  if (node) node.disconnect();
  const rate = started.sample_rate;
  const lead = started.max_lead_seconds;
  const fill = lead ? Math.min(START_FILL_SECONDS, lead / 2) : START_FILL_SECONDS;
  const capacity = Math.ceil((lead + SPARE_BUFFER_SECONDS) * rate + 2 * started.chunk_samples);
  node = new AudioWorkletNode(context, "jitter-buffer", {
    numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [started.channels],
    processorOptions: { channels: started.channels, capacity, startFill: Math.round(fill * rate),
      firstSample: started.first_sample, reportEvery: REPORT_EVERY_FRAMES },
  });
  node.port.onmessage = (event) => onReport(event.data);
  node.connect(context.destination);
  chunkStarts = [];
}

function post(message) {
  if (node) node.port.postMessage(message);
}

// Every report of the worklet: ack what was played, then update the figures and the waveform.
function onReport(report) {
  state.samplesPlayed = report.played;
  if (report.played > state.samplesAcked && (state.phase === "playing" || state.phase === "paused")) {
    send({ type: "ack", samples_played: report.played });
    state.samplesAcked = report.played;
    state.acksSent++;
  }
  Object.assign(state, { bufferedSamples: report.buffered, underruns: report.underruns,
    underrunFrames: report.underrunFrames, retractedLateFrames: report.retractedLateFrames, peak: report.peak });
  const deviceSeconds = (context.baseLatency || 0) + (context.outputLatency || 0);
  state.latencyMs = (report.buffered / state.sampleRate + deviceSeconds) * 1000;
  while (chunkStarts.length && chunkStarts[0].start <= report.played) {
    const chunk = chunkStarts.shift();
    if (chunk.revision !== state.playingRevision) {
      showPlaying(chunk.prompts, chunk.revision);
      waveform.marks.push({ column: waveform.lows.length + report.peaks.length / 2, label: `r${chunk.revision}` });
    }
  }
  if (steer && steer.sample !== null && report.played >= steer.sample) {
    state.steerLatencyMs = performance.now() - steer.sentAt;
    steer = null;
  }
  for (let index = 0; index < report.peaks.length; index += 2) {
    waveform.lows.push(report.peaks[index]);
    waveform.highs.push(report.peaks[index + 1]);
  }
  showFigures();
}

// -- transport ----------------------------------------------------------------------------------------------------

const isLive = () => state.phase === "playing" || state.phase === "paused";

async function play() {
  if (state.phase === "paused") return resume();
  if (!state.hello || isLive() || state.phase === "starting") return;
  state.phase = "starting";
  setButtons();
  try {
    await ensureContext();
  } catch (error) {
    HANDLERS.error({ message: `audio unavailable: ${error}` });
    return;
  }
  state.error = null;
  send({ type: "start", prompts: collectPrompts(), lead_seconds: Number($("lead").value) || 0 });
}

function pause() {
  send({ type: "pause" });
  context.suspend(); // silence now; the server stops generating after its current step
  state.phase = "paused";
  setButtons();
}

function resume() {
  send({ type: "resume" });
  context.resume();
  state.phase = "playing";
  setButtons();
}

function stop() {
  send({ type: "stop" });
  post({ type: "flush" });
  if (context.state === "suspended") context.resume();
  state.phase = "stopping";
  setButtons();
}

function applyPrompts() {
  const prompts = collectPrompts();
  steer = { sentAt: performance.now(), sample: null };
  send({ type: "prompt", prompts, transition_seconds: Number($("glide").value) || 0,
    rollback_seconds: $("instant").checked ? INSTANT_ROLLBACK_SECONDS : 0 });
  logLine(`sent prompts: ${describePrompts(prompts.map((p) => [p.text, p.weight]))}`);
}

function finishPlayback(text) {
  state.phase = "finished";
  logLine(text);
  setButtons();
}

// -- display ------------------------------------------------------------------------------------------------------

function setButtons() {
  const live = isLive();
  $("play").disabled = !state.hello || ["starting", "playing", "stopping"].includes(state.phase);
  $("play").textContent = state.phase === "paused" ? "▶ Resume" : "▶ Play";
  $("pause").disabled = state.phase !== "playing";
  $("stop").disabled = !live;
  $("apply").disabled = !live;
  $("fig-state").textContent = state.phase;
}

function showPlaying(prompts, revision) {
  state.playingPrompts = prompts;
  state.playingRevision = revision;
  $("now-playing").textContent = `${describePrompts(prompts)} (revision ${revision})`;
}

function showFigures() {
  const seconds = (samples) => samples / (state.sampleRate || 1);
  $("fig-latency").textContent = state.latencyMs === null ? "–" : `${state.latencyMs.toFixed(0)} ms`;
  $("fig-steer").textContent = state.steerLatencyMs === null ? "–" : `${state.steerLatencyMs.toFixed(0)} ms`;
  $("fig-buffer").textContent = `${(seconds(state.bufferedSamples) * 1000).toFixed(0)} ms`;
  $("fig-underruns").textContent = `${state.underruns}`;
  $("fig-rtf").textContent = state.realtimeFactor ? `${state.realtimeFactor.toFixed(2)}x` : "–";
  $("fig-played").textContent = `${seconds(state.samplesPlayed - state.firstSample).toFixed(1)} s`;
  $("fig-acks").textContent = `${state.acksSent} sent · ${state.gatewayAcks} at gateway`;
  $("fig-state").textContent = state.phase;
}

function badge(text, kind) {
  $("connection").textContent = text;
  $("connection").className = `badge ${kind}`;
}

function logLine(text, kind = "") {
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  item.className = kind;
  $("log").prepend(item);
  while ($("log").children.length > 200) $("log").lastChild.remove();
}

function drawWaveform() {
  const canvas = $("waveform");
  const graphics = canvas.getContext("2d");
  const [width, height] = [canvas.width, canvas.height];
  const excess = waveform.lows.length - width;
  if (excess > 0) {
    waveform.lows.splice(0, excess);
    waveform.highs.splice(0, excess);
    waveform.marks = waveform.marks.map((m) => ({ ...m, column: m.column - excess })).filter((m) => m.column >= 0);
  }
  graphics.clearRect(0, 0, width, height);
  graphics.strokeStyle = "#5aa9ff";
  graphics.beginPath();
  // scaled to what is on screen (quiet audio stays visible), never more than 20x
  const loudest = Math.max(0.05, ...waveform.highs, ...waveform.lows.map((low) => -low));
  const scale = height / 2 / loudest * 0.95;
  for (let x = 0; x < waveform.lows.length; x++) {
    graphics.moveTo(x + 0.5, height / 2 - waveform.highs[x] * scale);
    graphics.lineTo(x + 0.5, height / 2 - waveform.lows[x] * scale + 1);
  }
  graphics.stroke();
  graphics.fillStyle = graphics.strokeStyle = "#ffb347";
  for (const mark of waveform.marks) {
    graphics.fillRect(mark.column, 0, 1, height);
    graphics.fillText(mark.label, mark.column + 3, 12);
  }
  requestAnimationFrame(drawWaveform);
}

// -- start --------------------------------------------------------------------------------------------------------

const query = new URLSearchParams(location.search);
if (query.has("lead")) $("lead").value = query.get("lead");
buildPromptRows(4);
$("play").addEventListener("click", play);
$("pause").addEventListener("click", pause);
$("stop").addEventListener("click", stop);
$("apply").addEventListener("click", applyPrompts);
setButtons();
connect();
requestAnimationFrame(drawWaveform);
