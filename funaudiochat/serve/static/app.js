// The page: talks the OpenAI Realtime protocol to /v1/realtime. Audio is base64 pcm16 mono 24 kHz both ways.
// Hands-free: the microphone streams all the time and the server's VAD decides turns (and barge-in).
// Push-to-talk: audio streams while the button is held; release commits the turn and asks for an answer.
"use strict";

const RATE = 24000;
const $ = (id) => document.getElementById(id);

// What the page has done, for people (on screen) and for the browser test (window.funaudiochat.stats).
const stats = {samplesReceived: 0, samplesPlayed: 0, ttfa: [], answers: 0, cancelled: 0, errors: [], events: 0,
               transcripts: []};
window.funaudiochat = {stats};

let ws = null, ctx = null, player = null, capture = null;
let pttHeld = false;
let speechEndAt = null;        // when the user's turn ended (speech_stopped, or push-to-talk release)
let response = null;           // {id, itemId, bubble, firstAudio, itemStart, itemSamples}
let totalQueued = 0;           // samples ever handed to the player (minus flushed ones)
const userBubbles = {};        // item_id -> bubble

function setStatus(text) { $("status").textContent = text; }

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  const meta = document.createElement("div");
  meta.className = "meta";
  div.appendChild(meta);
  $("transcript").appendChild(div);
  $("transcript").scrollTop = $("transcript").scrollHeight;
  return div;
}

function send(event) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

// ---------------------------------------------------------------- audio <-> base64 pcm16
function toBase64Pcm16(float32) {
  const pcm = new Int16Array(float32.length);
  for (let i = 0; i < float32.length; i++) {
    const s = Math.max(-1, Math.min(1, float32[i]));
    pcm[i] = s < 0 ? s * 0x8000 : s * 0x7fff;
  }
  const bytes = new Uint8Array(pcm.buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function fromBase64Pcm16(b64) {
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length - (binary.length % 2));
  for (let i = 0; i < bytes.length; i++) bytes[i] = binary.charCodeAt(i);
  const pcm = new Int16Array(bytes.buffer);
  const out = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 0x8000;
  return out;
}

// ---------------------------------------------------------------- settings -> session.update
function sessionConfig() {
  const handsFree = $("mode").value === "vad";
  const s2s = $("modalities").value === "s2s";
  const session = {
    modalities: s2s ? ["text", "audio"] : ["text"],
    turn_detection: handsFree ? {type: "server_vad", silence_duration_ms: 500, prefix_padding_ms: 300} : null,
    input_audio_transcription: {model: "funaudiochat"},
  };
  if ($("voice").value) session.voice = $("voice").value;
  if ($("instructions").value.trim()) session.instructions = $("instructions").value.trim();
  return session;
}

function applySettings() {
  send({type: "session.update", session: sessionConfig()});
  $("talk").disabled = $("mode").value !== "ptt";
}

async function loadVoices(current) {
  const select = $("voice");
  let names = [];
  try {
    const key = $("apikey").value.trim();
    const reply = await fetch("/v1/voices", key ? {headers: {Authorization: "Bearer " + key}} : {});
    if (reply.ok) {
      const body = await reply.json();
      names = (body.data || body.voices || []).map((v) => (typeof v === "string" ? v : v.id || v.name));
    }
  } catch (err) { /* the list is optional: the session's own voice is still offered */ }
  if (current && !names.includes(current)) names.unshift(current);
  const keep = select.value || current || "";
  select.innerHTML = '<option value="">(server default)</option>';
  for (const name of names.filter(Boolean)) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    select.appendChild(option);
  }
  if (keep) select.value = keep;
}

// ---------------------------------------------------------------- playback and barge-in
function playChunk(samples) {
  if (!response.firstAudio) {
    response.firstAudio = performance.now();
    response.itemStart = totalQueued;
    if (speechEndAt !== null) {
      const ttfa = (response.firstAudio - speechEndAt) / 1000;
      stats.ttfa.push(ttfa);
      $("ttfa").textContent = ttfa.toFixed(2) + " s";
      response.bubble.querySelector(".meta").textContent = "first audio after " + ttfa.toFixed(2) + " s";
    }
  }
  response.itemSamples += samples.length;
  totalQueued += samples.length;
  stats.samplesReceived += samples.length;
  $("received").textContent = stats.samplesReceived;
  player.port.postMessage({type: "chunk", samples}, [samples.buffer]);
}

// Stop the answer that is playing: drop queued audio and tell the server how much was heard.
function interrupt() {
  if (!response) return;
  if (response.itemId && response.itemSamples) {
    const heard = Math.max(0, Math.min(stats.samplesPlayed - response.itemStart, response.itemSamples));
    send({type: "conversation.item.truncate", item_id: response.itemId, content_index: 0,
          audio_end_ms: Math.round(heard * 1000 / RATE)});
  }
  player.port.postMessage({type: "flush"});
  totalQueued = stats.samplesPlayed;
}

// ---------------------------------------------------------------- server events
function onServerEvent(event) {
  stats.events += 1;
  switch (event.type) {
    case "session.created":
    case "session.updated":
      setStatus("connected: " + (event.session.turn_detection ? "hands-free" : "push-to-talk"));
      if (event.type === "session.created") loadVoices(event.session.voice);
      break;
    case "input_audio_buffer.speech_started":
      if (response && !response.done) interrupt();  // barge-in: the server cancels the answer itself
      else if (response && stats.samplesPlayed < totalQueued) interrupt();
      setStatus("listening…");
      break;
    case "input_audio_buffer.speech_stopped":
      speechEndAt = performance.now();
      setStatus("thinking…");
      break;
    case "input_audio_buffer.committed":
      userBubbles[event.item_id] = bubble("user", "🎤 …");
      break;
    case "conversation.item.input_audio_transcription.completed":
      if (userBubbles[event.item_id]) userBubbles[event.item_id].querySelector(".text").textContent = event.transcript;
      break;
    case "conversation.item.created":
    case "conversation.item.added":
      if (event.item && event.item.role === "user" && !userBubbles[event.item.id]) {
        const text = (event.item.content || []).map((c) => c.text || c.transcript || "").join(" ").trim();
        if (text) userBubbles[event.item.id] = bubble("user", text);
      }
      break;
    case "response.created":
      response = {id: event.response.id, itemId: null, bubble: bubble("assistant", ""), firstAudio: null,
                  itemStart: totalQueued, itemSamples: 0, done: false};
      break;
    case "response.output_item.added":
      if (response) response.itemId = event.item.id;
      break;
    case "response.output_audio_transcript.delta":
    case "response.audio_transcript.delta":
    case "response.output_text.delta":
    case "response.text.delta":
      if (response) response.bubble.querySelector(".text").textContent += event.delta;
      break;
    case "response.output_audio_transcript.done":
    case "response.audio_transcript.done":
      stats.transcripts.push(event.transcript);
      break;
    case "response.output_text.done":
    case "response.text.done":
      stats.transcripts.push(event.text);
      break;
    case "response.output_audio.delta":
    case "response.audio.delta":
      if (response) playChunk(fromBase64Pcm16(event.delta));
      break;
    case "response.function_call_arguments.done":
      if (response) response.bubble.querySelector(".text").textContent += `\n[tool call ${event.name}(${event.arguments})]`;
      break;
    case "response.done":
      if (response) {
        response.done = true;
        const status = event.response.status;
        if (status !== "completed") response.bubble.querySelector(".meta").textContent += ` (${status})`;
        if (status === "cancelled") stats.cancelled += 1;
      }
      stats.answers += 1;
      $("answers").textContent = stats.answers;
      setStatus($("mode").value === "vad" ? "listening…" : "ready");
      break;
    case "error":
      stats.errors.push(event.error.message);
      bubble("error", event.error.message);
      break;
  }
}

// ---------------------------------------------------------------- connect
async function connect() {
  $("connect").disabled = true;
  setStatus("starting audio…");
  ctx = new AudioContext({sampleRate: RATE});
  await ctx.audioWorklet.addModule("/static/audio-worklet.js");
  await ctx.resume();
  const mic = await navigator.mediaDevices.getUserMedia(
    {audio: {channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true}});
  const source = ctx.createMediaStreamSource(mic);
  capture = new AudioWorkletNode(ctx, "capture");
  const mute = ctx.createGain();
  mute.gain.value = 0;
  source.connect(capture).connect(mute).connect(ctx.destination);  // keeps the capture node pulled
  player = new AudioWorkletNode(ctx, "player", {outputChannelCount: [1]});
  player.connect(ctx.destination);
  player.port.onmessage = (e) => {
    stats.samplesPlayed = e.data.played;
    $("played").textContent = stats.samplesPlayed;
  };
  capture.port.onmessage = (e) => {
    const block = e.data;
    let peak = 0;
    for (let i = 0; i < block.length; i++) peak = Math.max(peak, Math.abs(block[i]));
    $("meter").firstElementChild.style.width = Math.min(100, peak * 300) + "%";
    if ($("mode").value === "vad" || pttHeld) send({type: "input_audio_buffer.append", audio: toBase64Pcm16(block)});
  };

  const scheme = location.protocol === "https:" ? "wss" : "ws";
  // browsers cannot set headers on a WebSocket: the API key travels as a subprotocol, as OpenAI's clients do it
  const key = $("apikey").value.trim();
  ws = new WebSocket(`${scheme}://${location.host}/v1/realtime`,
                     key ? ["realtime", "openai-insecure-api-key." + key] : ["realtime"]);
  ws.onopen = () => { applySettings(); $("apply").disabled = false; };
  ws.onmessage = (e) => onServerEvent(JSON.parse(e.data));
  ws.onclose = () => { setStatus("disconnected"); $("connect").disabled = false; $("apply").disabled = true; };
  ws.onerror = () => setStatus("connection error");
}

// ---------------------------------------------------------------- push-to-talk
function pttDown() {
  if (pttHeld) return;
  if (response && !response.done) send({type: "response.cancel"});
  interrupt();
  send({type: "input_audio_buffer.clear"});
  pttHeld = true;
  $("talk").classList.add("active");
  setStatus("listening…");
}

function pttUp() {
  if (!pttHeld) return;
  pttHeld = false;
  $("talk").classList.remove("active");
  send({type: "input_audio_buffer.commit"});
  send({type: "response.create"});
  speechEndAt = performance.now();
  setStatus("thinking…");
}

$("connect").onclick = () => connect().catch((err) => { setStatus("error: " + err.message); $("connect").disabled = false; });
$("apply").onclick = applySettings;
$("mode").onchange = () => ws && applySettings();
$("modalities").onchange = () => ws && applySettings();
$("voice").onchange = () => ws && applySettings();
$("talk").addEventListener("pointerdown", pttDown);
$("talk").addEventListener("pointerup", pttUp);
$("talk").addEventListener("pointerleave", pttUp);
document.addEventListener("keydown", (e) => { if (e.code === "Space" && e.target === document.body && $("mode").value === "ptt") { e.preventDefault(); pttDown(); } });
document.addEventListener("keyup", (e) => { if (e.code === "Space" && e.target === document.body && $("mode").value === "ptt") { e.preventDefault(); pttUp(); } });
