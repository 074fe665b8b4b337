// The jitter buffer, on the audio rendering thread: a ring indexed by stream sample number.
//
// The main thread posts chunks ({type: "chunk", start, pcm}), retractions and state changes; process() copies
// from the ring to the output and reports, every `reportEvery` frames, the stream sample it has played up to:
// the page acks exactly that, as the native Player acks what its PortAudio callback consumed. Playback starts
// once `startFill` frames are buffered; running dry mid-stream is an underrun (silence, counted, then a refill)
// unless the session is paused or finished.

class JitterBuffer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { channels, capacity, startFill, firstSample, reportEvery } = options.processorOptions;
    this.channels = channels;
    this.capacity = capacity; // frames
    this.ring = new Float32Array(capacity * channels); // interleaved; frame n lives at n % capacity
    this.startFill = startFill;
    this.reportEvery = reportEvery;
    this.firstSample = firstSample;
    this.readSample = firstSample; // next stream sample to play = samples played so far (what is acked)
    this.writeSample = firstSample; // end of what is buffered
    this.playing = false; // false: filling (at the start and after an underrun)
    this.idle = false; // paused by the server: running dry is not an underrun
    this.ended = false; // the session finished: play out what is left
    this.underruns = 0;
    this.underrunFrames = 0;
    this.retractedLateFrames = 0; // retracted audio already played (the margin was too small)
    this.droppedFrames = 0; // audio that did not fit (only an unpaced session could cause it)
    this.peak = 0; // largest |sample| played, for the test
    this.sinceReport = 0;
    this.peaks = []; // [min, max] per render quantum since the last report, for the waveform
    this.port.onmessage = (event) => this.receive(event.data);
  }

  get buffered() {
    return this.writeSample - this.readSample;
  }

  receive(message) {
    switch (message.type) {
      case "chunk": this.write(message.start, message.pcm); break;
      case "retract": this.retract(message.sample); break;
      case "idle": this.idle = message.idle; break;
      case "end": this.ended = true; break;
      case "flush": this.writeSample = this.readSample; this.ended = true; break;
    }
  }

  // Place a chunk at its stream position: a gap before it is silence, an overlap with played audio is skipped.
  write(start, pcm) {
    const channels = this.channels;
    let frames = pcm.length / channels;
    let from = 0;
    if (start < this.readSample) { from = this.readSample - start; start = this.readSample; }
    if (start > this.writeSample) this.zero(this.writeSample, start);
    const room = this.readSample + this.capacity - start;
    if (frames - from > room) { this.droppedFrames += frames - from - room; frames = from + room; }
    for (let frame = from; frame < frames; frame++) {
      const at = ((start + frame - from) % this.capacity) * channels;
      for (let c = 0; c < channels; c++) this.ring[at + c] = pcm[frame * channels + c];
    }
    this.writeSample = Math.max(this.writeSample, start + frames - from);
  }

  zero(from, to) {
    for (let n = from; n < to; n++) {
      const at = (n % this.capacity) * this.channels;
      this.ring.fill(0, at, at + this.channels);
    }
  }

  // The server took back its audio from `sample` on; the next chunk starts there again.
  retract(sample) {
    this.retractedLateFrames += Math.max(0, this.readSample - sample);
    this.writeSample = Math.min(this.writeSample, Math.max(sample, this.readSample));
  }

  process(inputs, outputs) {
    const output = outputs[0];
    const frames = output[0].length;
    if (!this.playing) {
      if (this.buffered >= this.startFill || (this.buffered > 0 && (this.ended || this.idle))) {
        this.playing = true;
      } else {
        if (!this.idle && !this.ended && this.readSample > this.firstSample) this.underrunFrames += frames;
        this.afterQuantum(frames, 0, 0);
        return true;
      }
    }
    const copied = Math.min(frames, this.buffered);
    let low = 0, high = 0;
    for (let frame = 0; frame < copied; frame++) {
      const at = ((this.readSample + frame) % this.capacity) * this.channels;
      for (let c = 0; c < output.length; c++) {
        const value = this.ring[at + Math.min(c, this.channels - 1)];
        output[c][frame] = value;
        if (c === 0) { if (value < low) low = value; if (value > high) high = value; }
      }
    }
    this.readSample += copied;
    this.peak = Math.max(this.peak, -low, high);
    if (copied < frames) {
      if (!this.idle && !this.ended) { this.underruns++; this.underrunFrames += frames - copied; }
      this.playing = false;
    }
    this.afterQuantum(frames, low, high);
    return true;
  }

  afterQuantum(frames, low, high) {
    this.peaks.push(low, high);
    this.sinceReport += frames;
    if (this.sinceReport < this.reportEvery) return;
    this.sinceReport = 0;
    this.port.postMessage({
      played: this.readSample, buffered: this.buffered, underruns: this.underruns,
      underrunFrames: this.underrunFrames, retractedLateFrames: this.retractedLateFrames,
      droppedFrames: this.droppedFrames, peak: this.peak, playing: this.playing, peaks: this.peaks,
    });
    this.peaks = [];
  }
}

registerProcessor("jitter-buffer", JitterBuffer);
