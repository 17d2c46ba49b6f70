// apt2-jax demo page: WebSocket client, keyboard camera, mouse puppet, paced frame display that
// acknowledges each step it shows, key-to-frame latency.
// Protocol: see apt2_jax/inference/serve.py.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  ws: null, hello: null, image: null, format: "jpeg", nextFormat: "jpeg", keys: new Set(), pose: null,
  queue: [], incoming: null, framesShown: 0, framesReceived: 0, framesDropped: 0, modelFps: 0,
  inFlight: null, shownTimes: [], nextDue: 0, paused: false, drag: -1,
  seq: 0, sentAt: new Map(), latencies: [], queueSamples: [], maxQueue: 0, shownSteps: [],
};
window.demo = state;  // for tests and debugging

function log(msg) {
  const el = $("log");
  el.textContent = (msg + "\n" + el.textContent).slice(0, 2000);
}

function connect() {
  const ws = new WebSocket(`ws://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onopen = () => { $("status").textContent = "connected"; };
  ws.onclose = (e) => { $("status").textContent = `disconnected (${e.code} ${e.reason})`; };
  ws.onmessage = (e) => {
    if (typeof e.data === "string") onJson(JSON.parse(e.data));
    else onFrame(e.data);
  };
}

function send(obj) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(obj));
}

function onJson(msg) {
  switch (msg.type) {
    case "hello": setup(msg); break;
    case "busy": $("status").textContent = "busy: " + msg.message; log(msg.message); break;
    case "started":
      // A new stream: frames of the one before are dropped; the first frame follows.
      state.format = state.nextFormat;
      state.queue = []; state.nextDue = 0;
      state.incoming = {index: 0, controlSeq: 0, remaining: 1};
      $("status").textContent = `streaming (seed ${msg.seed})`;
      break;
    case "frames":
      state.modelFps = msg.fps; state.inFlight = msg.in_flight;
      state.incoming = {index: msg.index, controlSeq: msg.control_seq, remaining: msg.count};
      $("status").textContent = `streaming: step ${msg.index}, ${msg.step_ms} ms/step`;
      break;
    case "ack": showControl(msg.control); break;
    case "text_ack": log(`caption -> "${msg.text}"`); break;
    case "error": log("error: " + msg.message); break;
  }
}

function setup(hello) {
  state.hello = hello;
  $("view").width = hello.width; $("view").height = hello.height;
  $("modelInfo").textContent = `control: ${hello.control_type}, ${hello.width}x${hello.height}, ` +
      `world: ${hello.world || "–"}, target ${hello.fps > 0 ? hello.fps + " fps" : "as fast as possible"}`;
  $("overlay").className = hello.control_type === "pose" ? "pose" : "";
  state.pose = hello.rest_pose.map((p) => p.slice());
  const box = $("examples");
  box.innerHTML = "";
  hello.examples.forEach((ex, i) => {
    const img = document.createElement("img");
    img.src = `/examples/${ex.name}.png`;
    img.title = ex.caption || ex.name;
    img.dataset.name = ex.name;
    img.onclick = () => selectExample(ex, img);
    box.appendChild(img);
    if (i === 0) selectExample(ex, img);
  });
  drawOverlay();
}

function selectExample(ex, img) {
  document.querySelectorAll(".examples img").forEach((el) => el.classList.remove("selected"));
  img.classList.add("selected");
  state.image = "example:" + ex.name;
  if (ex.caption) $("caption").value = ex.caption;
}

$("upload").onchange = () => {
  const file = $("upload").files[0];
  if (!file) return;
  if (!["image/png", "image/jpeg"].includes(file.type)) { log("only PNG or JPEG"); return; }
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;
    document.querySelectorAll(".examples img").forEach((el) => el.classList.remove("selected"));
    log(`uploaded ${file.name} (${file.size} bytes)`);
  };
  reader.readAsDataURL(file);
};

$("start").onclick = () => {
  state.nextFormat = $("format").value;
  // "ack": the server generates a step when we show the one before (at most one in flight).
  send({type: "start", image: state.image, text: $("caption").value,
        seed: parseInt($("seed").value || "0", 10), format: state.nextFormat, ack: true});
  if (state.keys.size) sendKeys();
};
$("pause").onclick = () => {
  state.paused = !state.paused;
  send({type: state.paused ? "pause" : "resume"});
  $("pause").textContent = state.paused ? "Resume" : "Pause";
};
$("setText").onclick = () => send({type: "text", text: $("caption").value});
$("caption").addEventListener("keydown", (e) => {
  if (e.key === "Enter") send({type: "text", text: $("caption").value});
});

// -- frames ---------------------------------------------------------------------------------
// Each binary message is one frame of the latest "started"/"frames" message; it takes its place in
// the queue at once (decoding is asynchronous) and is shown when decoded and due.
function onFrame(buf) {
  state.framesReceived++;
  const inc = state.incoming;
  if (!inc || inc.remaining <= 0) return;  // not announced: a stream that was replaced
  const count = inc.index === 0 ? 1 : state.hello.frames_per_step;
  const item = {index: inc.index, first: inc.remaining === count, controlSeq: inc.controlSeq, image: null};
  inc.remaining--;
  state.queue.push(item);
  decode(buf).then((image) => { item.image = image; }, (e) => { item.image = "bad"; log("bad frame: " + e); });
}

async function decode(buf) {
  const h = state.hello;
  if (state.format === "raw") {
    const rgb = new Uint8Array(buf);
    const rgba = new Uint8ClampedArray(h.width * h.height * 4);
    for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
      rgba[j] = rgb[i]; rgba[j + 1] = rgb[i + 1]; rgba[j + 2] = rgb[i + 2]; rgba[j + 3] = 255;
    }
    return new ImageData(rgba, h.width, h.height);
  }
  return createImageBitmap(new Blob([buf], {type: "image/jpeg"}));
}

function quantile(values, q) {
  if (!values.length) return NaN;
  const s = values.slice().sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))];
}

// Frames are shown at the server's target rate (hello.fps; 0: as they come). Showing the first
// frame of a step acknowledges it ("shown"), which lets the server generate the next one, and
// measures the key-to-frame latency of every control message that step is the first to use.
function display(now) {
  const h = state.hello;
  const interval = h && h.fps > 0 ? 1000 / h.fps : 0;
  // Stale frames (more than two steps waiting) are dropped, keeping the newest step.
  const limit = 2 * (h ? h.frames_per_step : 4);
  while (state.queue.length > limit) { state.queue.shift(); state.framesDropped++; }
  const head = state.queue[0];
  if (head && head.image && now >= state.nextDue - 1) {
    state.queue.shift();
    if (head.image !== "bad") {
      const ctx = $("view").getContext("2d");
      if (head.image instanceof ImageData) ctx.putImageData(head.image, 0, 0);
      else ctx.drawImage(head.image, 0, 0, $("view").width, $("view").height);
      // Tests set `demo.capture = []` to record the frames shown (PNG data URLs).
      if (state.capture) state.capture.push({url: $("view").toDataURL(), index: head.index, controlSeq: head.controlSeq});
    }
    state.nextDue = now - state.nextDue > interval ? now + interval : state.nextDue + interval;
    state.framesShown++;
    state.shownTimes.push(now);
    while (state.shownTimes.length && now - state.shownTimes[0] > 2000) state.shownTimes.shift();
    if (head.first) {
      send({type: "shown", index: head.index});
      state.shownSteps.push([now, head.index, head.controlSeq]);
      if (state.shownSteps.length > 20000) state.shownSteps.shift();
      for (const [seq, t] of state.sentAt) {
        if (seq <= head.controlSeq) { state.latencies.push(now - t); state.sentAt.delete(seq); }
      }
      if (state.latencies.length > 5000) state.latencies.shift();
    }
  }
  state.maxQueue = Math.max(state.maxQueue, state.queue.length);
  state.queueSamples.push([now, state.queue.length]);
  if (state.queueSamples.length > 20000) state.queueSamples.shift();
  const n = state.shownTimes.length;
  const shownFps = n > 1 ? (n - 1) * 1000 / (state.shownTimes[n - 1] - state.shownTimes[0]) : 0;
  const recent = state.latencies.slice(-50);
  const lat = recent.length
      ? `${quantile(recent, 0.5).toFixed(0)} ms (p95 ${quantile(recent, 0.95).toFixed(0)})` : "–";
  $("stats").textContent = `model: ${state.modelFps.toFixed(1)} fps | display: ${shownFps.toFixed(1)} fps` +
      ` | key→frame: ${lat} | queue: ${state.queue.length}`;
  $("frameCount").textContent = `frames shown: ${state.framesShown}, dropped: ${state.framesDropped}` +
      (state.inFlight === null ? "" : `, steps in flight: ${state.inFlight}`);
  requestAnimationFrame(display);
}
requestAnimationFrame(display);

// -- camera keys ----------------------------------------------------------------------------
function keyName(e) { return e.key.length === 1 ? e.key.toLowerCase() : e.key.toLowerCase(); }

// Every control message carries a sequence number; the frames name the one they used.
function sendControl(body) {
  const seq = ++state.seq;
  state.sentAt.set(seq, performance.now());
  send(Object.assign({type: "control", seq: seq}, body));
}

function sendKeys() {
  const keys = [...state.keys];
  $("keysHeld").textContent = "keys: " + (keys.length ? keys.join(" ") : "none");
  sendControl({keys: keys});
}

document.addEventListener("keydown", (e) => {
  if (!state.hello || state.hello.control_type !== "camera" || e.target.tagName === "INPUT") return;
  const k = keyName(e);
  if (!(k in state.hello.keys)) return;
  e.preventDefault();
  if (!state.keys.has(k)) { state.keys.add(k); sendKeys(); }
});
document.addEventListener("keyup", (e) => {
  const k = keyName(e);
  if (state.keys.delete(k)) sendKeys();
});
window.addEventListener("blur", () => { if (state.keys.size) { state.keys.clear(); sendKeys(); } });

function showControl(control) {
  if (!control) { $("camera").textContent = "camera: still"; return; }
  if (control.camera) {
    const names = ["pan", "tilt", "zoom", "forward", "roll"];
    $("camera").textContent = "camera: " + names.map((n, i) => `${n} ${control.camera[i].toFixed(3)}`).join(", ");
  } else if (control.keypoints) {
    $("camera").textContent = "pose: " + control.keypoints.length + " joints";
  }
}

// -- puppet joints --------------------------------------------------------------------------
function drawOverlay() {
  const cv = $("overlay"), ctx = cv.getContext("2d");
  ctx.clearRect(0, 0, cv.width, cv.height);
  if (!state.hello || state.hello.control_type !== "pose") return;
  const P = state.pose, W = cv.width, H = cv.height;
  ctx.strokeStyle = "rgba(255,255,255,0.6)"; ctx.lineWidth = 2;
  for (const [a, b] of state.hello.bones) {
    ctx.beginPath(); ctx.moveTo(P[a][0] * W, P[a][1] * H); ctx.lineTo(P[b][0] * W, P[b][1] * H); ctx.stroke();
  }
  P.forEach(([x, y], i) => {
    ctx.fillStyle = i === state.drag ? "#ff0" : "#4af";
    ctx.beginPath(); ctx.arc(x * W, y * H, 6, 0, 2 * Math.PI); ctx.fill();
  });
}

function pointer(e) {
  const r = $("overlay").getBoundingClientRect();
  return [Math.min(1, Math.max(0, (e.clientX - r.left) / r.width)),
          Math.min(1, Math.max(0, (e.clientY - r.top) / r.height))];
}
let lastPoseSend = 0;
$("overlay").addEventListener("mousedown", (e) => {
  if (!state.hello || state.hello.control_type !== "pose") return;
  const [x, y] = pointer(e);
  let best = -1, bestD = 0.05;
  state.pose.forEach(([px, py], i) => { const d = Math.hypot(px - x, py - y); if (d < bestD) { best = i; bestD = d; } });
  state.drag = best; drawOverlay();
});
window.addEventListener("mousemove", (e) => {
  if (state.drag < 0) return;
  state.pose[state.drag] = pointer(e);
  drawOverlay();
  const now = performance.now();
  if (now - lastPoseSend > 50) { lastPoseSend = now; sendControl({keypoints: state.pose}); }
});
window.addEventListener("mouseup", () => {
  if (state.drag >= 0) { sendControl({keypoints: state.pose}); state.drag = -1; drawOverlay(); }
});

connect();
