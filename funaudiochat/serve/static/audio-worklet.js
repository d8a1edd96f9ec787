// AudioWorklet processors of the page (no build step).
// "capture": copies the microphone's samples (mono, the AudioContext's rate) to the main thread in ~40 ms blocks.
// "player": plays queued float32 chunks in order; reports how many samples it has played so the page can tell the
// server where a barge-in cut the answer; "flush" drops what is queued (barge-in).

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = new Float32Array(Math.round(sampleRate * 0.04));
    this.filled = 0;
  }
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      let i = 0;
      while (i < channel.length) {
        const n = Math.min(channel.length - i, this.block.length - this.filled);
        this.block.set(channel.subarray(i, i + n), this.filled);
        this.filled += n;
        i += n;
        if (this.filled === this.block.length) {
          this.port.postMessage(this.block.slice(0));
          this.filled = 0;
        }
      }
    }
    return true;
  }
}

class PlayerProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = [];    // Float32Array chunks
    this.offset = 0;    // read position in queue[0]
    this.played = 0;    // samples played since the last "reset"
    this.lastReport = 0;
    this.port.onmessage = (e) => {
      const msg = e.data;
      if (msg.type === "chunk") this.queue.push(msg.samples);
      else if (msg.type === "flush") { this.queue = []; this.offset = 0; this.report(); }
      else if (msg.type === "reset") { this.played = 0; this.report(); }
    };
  }
  report() {
    const queued = this.queue.reduce((n, c) => n + c.length, 0) - this.offset;
    this.port.postMessage({played: this.played, queued});
  }
  process(inputs, outputs) {
    const out = outputs[0][0];
    let i = 0;
    while (i < out.length && this.queue.length) {
      const chunk = this.queue[0];
      const n = Math.min(out.length - i, chunk.length - this.offset);
      out.set(chunk.subarray(this.offset, this.offset + n), i);
      i += n;
      this.offset += n;
      this.played += n;
      if (this.offset === chunk.length) { this.queue.shift(); this.offset = 0; }
    }
    out.fill(0, i);
    if (currentTime - this.lastReport > 0.05) { this.lastReport = currentTime; this.report(); }
    return true;
  }
}

registerProcessor("capture", CaptureProcessor);
registerProcessor("player", PlayerProcessor);
