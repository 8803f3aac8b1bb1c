// The voice-chat page: a thin client of the server's public API (/v1/realtime, docs/protocol.md).
//
// One click starts: the microphone is captured by an AudioWorklet, resampled to 24 kHz PCM16 and
// streamed in 40 ms `input_audio_buffer.append` events for the whole session, also while the server
// speaks (full duplex: the model itself hears the user barge in). The server's audio goes into a
// jitter buffer (the "pcm-player" worklet); an interruption drops what is buffered at once.
//
// `window.voiceChat` holds counters that tests (and curious people, in the console) read.

// jitter buffer: 3 server frames; ?buffer_ms=400 for a slow or jittery network (or server)
const PREBUFFER_MS = Math.min(2000, Math.max(40, Number(new URLSearchParams(location.search).get("buffer_ms")) || 120));
const BACKOFF_MS = { lost: [500, 15000], refused: [3000, 30000] }; // first and largest retry delay
const KEY_STORE = "voiceChat.apiKey";
const MAX_UNSENT_BYTES = 64 * 1024; // about 1 s of microphone events waiting in the socket

const stats = {
  state: "idle", sessionId: null, connects: 0, reconnects: 0, framesSent: 0, framesSkipped: 0, chunksReceived: 0,
  chunksPlayed: 0, chunksDropped: 0, playedMs: 0, droppedMs: 0, bufferedMs: 0, underruns: 0, interruptions: 0,
  level: -60, peakLevel: -60, lastError: null, lastClose: null, events: {}, bufferMs: PREBUFFER_MS,
};
window.voiceChat = stats;

const $ = (id) => document.getElementById(id);
const ui = {
  start: $("start"), status: $("status"), level: $("level"), speaking: $("speaking"),
  interrupted: $("interrupted"), keyForm: $("key-form"), key: $("api-key"), transcript: $("transcript"),
  textForm: $("text-form"), text: $("text"), send: $("send"),
};

// ------------------------------------------------------------------ page state
function setState(state, message) {
  stats.state = state;
  ui.status.dataset.state = state;
  ui.status.textContent = message;
  const running = !["idle", "mic-denied", "failed"].includes(state);
  ui.start.textContent = running ? "Stop" : "Start";
  ui.start.setAttribute("aria-pressed", String(running));
  ui.text.disabled = ui.send.disabled = state !== "live";
  ui.keyForm.hidden = state !== "needs-key";
}

function tell(message) {
  // a line in the status box that does not change the state (the state's own message comes back later)
  if (stats.state === "live") ui.status.textContent = message;
}

function addEntry(role, text, id) {
  const li = document.createElement("li");
  li.className = role;
  if (id) li.dataset.id = id;
  const who = document.createElement("span");
  who.className = "visually-hidden";
  who.textContent = { user: "You: ", assistant: "Assistant: " }[role.split(" ")[0]] || "";
  li.append(who);
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(body);
  ui.transcript.append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function entry(id) {
  return id ? ui.transcript.querySelector(`li[data-id="${CSS.escape(id)}"]`) : null;
}

function note(li, text) {
  if (!li || li.querySelector(".note")) return;
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  li.append(span);
}

// ------------------------------------------------------------------ audio
let ctx = null, stream = null, mic = null, player = null;

async function startAudio() {
  if (!window.isSecureContext || !navigator.mediaDevices?.getUserMedia) {
    throw Object.assign(new Error("insecure"), { name: "InsecureContext" });
  }
  // created before the first await, while the click still counts as a user gesture (autoplay policy)
  ctx = new AudioContext({ latencyHint: "interactive" });
  stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  await ctx.audioWorklet.addModule("static/audio-worklet.js");
  mic = new AudioWorkletNode(ctx, "mic-capture", {
    numberOfInputs: 1, numberOfOutputs: 0, channelCount: 1, channelCountMode: "explicit",
  });
  mic.port.onmessage = ({ data }) => onMicChunk(data);
  ctx.createMediaStreamSource(stream).connect(mic);
  player = new AudioWorkletNode(ctx, "pcm-player", {
    numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1], processorOptions: { prebufferMs: PREBUFFER_MS },
  });
  player.port.onmessage = ({ data }) => onPlayerStats(data);
  player.connect(ctx.destination);
  await ctx.resume();
  for (const track of stream.getAudioTracks()) {
    track.addEventListener("ended", () => stop("The microphone was disconnected. Press Start to use another one."));
  }
}

function stopAudio() {
  stream?.getTracks().forEach((t) => t.stop());
  ctx?.close();
  ctx = stream = mic = player = null;
}

function onMicChunk({ pcm, rms }) {
  const db = Math.max(-60, Math.min(0, 20 * Math.log10(rms + 1e-9)));
  stats.level = db;
  stats.peakLevel = Math.max(stats.peakLevel, db);
  ui.level.value = db;
  ui.level.textContent = `${Math.round(db)} dBFS`;
  if (ws?.readyState !== WebSocket.OPEN || !stats.sessionId) return; // not connected: the audio is not kept
  if (ws.bufferedAmount > MAX_UNSENT_BYTES) {
    stats.framesSkipped++; // the network is behind: old microphone audio is worth less than new
    return;
  }
  ws.send(JSON.stringify({ type: "input_audio_buffer.append", audio: toBase64(pcm) }));
  stats.framesSent++;
}

function onPlayerStats({ stats: s, droppedMs }) {
  Object.assign(stats, {
    chunksPlayed: s.chunksPlayed, chunksDropped: s.chunksDropped, playedMs: s.playedMs, bufferedMs: s.bufferedMs,
    underruns: s.underruns,
  });
  if (droppedMs !== undefined) stats.droppedMs += droppedMs;
}

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function fromBase64(b64) {
  const s = atob(b64);
  const bytes = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
  return bytes.buffer; // PCM16 little-endian, as every platform a browser runs on
}

// ------------------------------------------------------------------ the connection
let ws = null, stopped = true, retryTimer = null, attempt = 0, refused = null;
let response = null; // the running response: {id, item: its transcript entry}
const interruptedIds = new Set();
let pendingText = false; // a typed message waits for the running response to end

function wsUrl() {
  const url = new URL("v1/realtime", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) url.searchParams.set("api_key", key);
  return url.href;
}

function connect() {
  clearTimeout(retryTimer);
  refused = null;
  let opened = false;
  const sock = (ws = new WebSocket(wsUrl()));
  sock.onopen = () => { opened = true; };
  sock.onmessage = (e) => {
    if (typeof e.data === "string") onEvent(JSON.parse(e.data));
  };
  sock.onclose = (e) => {
    if (sock !== ws) return;
    stats.lastClose = { code: e.code, reason: e.reason };
    onClosed(e.code, opened);
  };
}

async function onClosed(code, opened) {
  const hadSession = stats.sessionId !== null;
  stats.sessionId = null;
  endResponse("connection lost");
  if (stopped) return;
  if (refused || (code === 1013 && !hadSession)) {
    retry("refused", (s) => `${refused || "The server is full."} Trying again in ${s} s…`);
  } else if (!opened && (await needsKey())) {
    const had = sessionStorage.getItem(KEY_STORE);
    setState("needs-key", had ? "The API key was not accepted. Enter the right one." : "This server needs an API key.");
    ui.key.focus();
  } else if (code === 1008) {
    stop(`The server closed the session: ${stats.lastClose.reason || "policy violation"}. Press Start to begin again.`, "failed");
  } else if (code === 1001 || code === 1012) {
    // a drain (1001) or a lost replica (1012): the server is being restarted or replaced, not the network
    retry("lost", (s) => `The server is restarting. Reconnecting in ${s} s (attempt ${attempt})…`);
  } else {
    retry("lost", (s) => `Connection lost. Reconnecting in ${s} s (attempt ${attempt})…`);
  }
}

async function needsKey() {
  // A refused handshake looks like any network failure to a browser: ask an endpoint that answers 401.
  const key = sessionStorage.getItem(KEY_STORE);
  try {
    const r = await fetch("v1/engine/stats", { headers: key ? { Authorization: `Bearer ${key}` } : {} });
    return r.status === 401;
  } catch {
    return false; // the server is unreachable: reconnect
  }
}

function retry(kind, message) {
  const [first, most] = BACKOFF_MS[kind];
  attempt++;
  const delay = Math.min(most, first * 2 ** (attempt - 1)) * (0.75 + 0.25 * Math.random());
  setState(kind === "refused" ? "refused" : "reconnecting", message(Math.ceil(delay / 1000)));
  retryTimer = setTimeout(() => {
    if (stopped) return;
    if (kind === "lost") stats.reconnects++;
    connect();
  }, delay);
}

function send(event) {
  if (ws?.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

// ------------------------------------------------------------------ server events
function onEvent(ev) {
  stats.events[ev.type] = (stats.events[ev.type] || 0) + 1;
  switch (ev.type) {
    case "session.created":
      if (stats.connects++ > 0) addEntry("system", "Reconnected: a new session (the server does not remember the last one).");
      stats.sessionId = ev.session.id;
      attempt = 0;
      setState("live", "Connected. Speak, or type a message.");
      break;
    case "error":
      stats.lastError = ev.error.code;
      if (ev.error.code === "session_limit_reached") {
        refused = "The server is full: every voice session is taken.";
      } else {
        tell(`The server says: ${ev.error.message}`);
      }
      break;
    case "input_audio_buffer.speech_started":
      // while it speaks (or plays out what it said), this is the user barging in
      if (response || stats.bufferedMs > 0) interrupt(response?.id, "you spoke");
      else ui.speaking.hidden = false;
      break;
    case "input_audio_buffer.speech_stopped":
      ui.speaking.hidden = true;
      break;
    case "conversation.item.added":
    case "conversation.item.created":
      if (ev.item.role === "user" && !entry(ev.item.id) && ev.item.content?.[0]?.type === "input_audio") {
        addEntry("user pending", "…", ev.item.id);
      }
      break;
    case "conversation.item.input_audio_transcription.completed": {
      const li = entry(ev.item_id);
      if (li) {
        li.classList.remove("pending");
        li.querySelector(".text").textContent = ev.transcript || "(nothing heard)";
      }
      break;
    }
    case "conversation.item.input_audio_transcription.failed": {
      const li = entry(ev.item_id);
      if (li) li.querySelector(".text").textContent = "(could not be transcribed)";
      break;
    }
    case "response.created":
      response = { id: ev.response.id, item: null };
      ui.interrupted.hidden = ui.speaking.hidden = true; // the detector pauses while it speaks
      tell("Answering. Speak to interrupt.");
      break;
    case "response.output_item.added":
      if (response) response.item = addEntry("assistant", "", ev.item.id);
      break;
    case "response.output_audio_transcript.delta":
    case "response.audio_transcript.delta": {
      const li = entry(ev.item_id) || (response && (response.item = addEntry("assistant", "", ev.item_id)));
      if (li) li.querySelector(".text").textContent += ev.delta;
      break;
    }
    case "response.output_audio.delta":
    case "response.audio.delta":
      if (interruptedIds.has(ev.response_id) || !player) break; // never play a word after a barge-in
      stats.chunksReceived++;
      {
        const pcm = fromBase64(ev.delta);
        player.port.postMessage({ type: "chunk", pcm }, [pcm]);
      }
      break;
    case "response.output_audio.done":
    case "response.audio.done":
      player?.port.postMessage({ type: "end" });
      break;
    case "response.done": {
      const { status, status_details: details } = ev.response;
      if (status === "interrupted") interrupt(ev.response.id, "you spoke");
      else if (status === "cancelled") note(response?.item, "stopped");
      else if (status === "failed") note(response?.item, `failed: ${details?.reason || "unknown"}`);
      if (status !== "interrupted") tell("Listening. Speak, or type a message.");
      response = null;
      if (pendingText) {
        pendingText = false;
        send({ type: "response.create" });
      }
      break;
    }
  }
}

function interrupt(responseId, why) {
  const key = responseId || `playback-${stats.interruptions}`;
  if (interruptedIds.has(key)) return;
  interruptedIds.add(key);
  stats.interruptions++;
  player?.port.postMessage({ type: "clear" });
  stats.bufferedMs = 0;
  ui.interrupted.hidden = false;
  tell(`Interrupted (${why}): the rest of the answer was dropped. Listening.`);
  const current = response && response.id === responseId ? response.item : null;
  note(current || [...ui.transcript.querySelectorAll("li.assistant")].at(-1), `interrupted: ${why}`);
}

function endResponse(why) {
  if (!response) return;
  note(response.item, why);
  response = null;
  pendingText = false;
  player?.port.postMessage({ type: "clear" });
}

// ------------------------------------------------------------------ controls
async function start() {
  stopped = false;
  attempt = 0;
  setState("connecting", "Starting the microphone…");
  ui.start.disabled = true; // until the microphone is settled: a second click must not race the first
  try {
    await startAudio();
  } catch (e) {
    stopAudio();
    stopped = true;
    const message = {
      NotAllowedError: "Microphone access was denied. Allow it for this site (the icon in the address bar), then press Start.",
      SecurityError: "Microphone access was denied. Allow it for this site (the icon in the address bar), then press Start.",
      NotFoundError: "No microphone was found. Connect one, then press Start.",
      NotReadableError: "The microphone is in use by another program. Close it, then press Start.",
      InsecureContext: "The microphone needs a secure page: open this over https, or on localhost.",
    }[e.name] || `Could not start audio: ${e.message}`;
    setState(e.name === "NotAllowedError" || e.name === "SecurityError" ? "mic-denied" : "failed", message);
    return;
  } finally {
    ui.start.disabled = false;
  }
  setState("connecting", "Connecting…");
  connect();
}

function stop(message = "Stopped. Press Start to talk again.", state = "idle") {
  stopped = true;
  clearTimeout(retryTimer);
  endResponse("stopped");
  const sock = ws;
  ws = null;
  sock?.close(1000);
  stats.sessionId = null;
  stopAudio();
  ui.speaking.hidden = true;
  setState(state, message);
}

ui.start.addEventListener("click", () => (stopped ? start() : stop()));

ui.keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY_STORE, ui.key.value.trim());
  ui.key.value = "";
  attempt = 0;
  setState("connecting", "Connecting…");
  connect();
});

ui.textForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = ui.text.value.trim();
  if (!text || stats.state !== "live") return;
  ui.text.value = "";
  addEntry("user", text);
  send({ type: "conversation.item.create", item: { type: "message", role: "user", content: [{ type: "input_text", text }] } });
  if (response) {
    // typing over the voice: stop it, and answer once the server confirms
    pendingText = true;
    interrupt(response.id, "you typed");
    send({ type: "response.cancel" });
  } else {
    send({ type: "response.create" });
  }
});

window.addEventListener("online", () => {
  if (!stopped && (stats.state === "reconnecting" || stats.state === "refused")) {
    attempt = 0;
    connect();
  }
});

setState("idle", "Press Start and allow the microphone.");
