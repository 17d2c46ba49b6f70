// apt2-jax demo page: WebSocket client, keyboard camera, mouse puppet, paced frame display.
// Protocol: see apt2_jax/inference/serve.py.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  ws: null, hello: null, image: null, format: "jpeg", keys: new Set(), pose: null,
  queue: [], pendingFrames: 0, framesShown: 0, framesReceived: 0, modelFps: 0,
  shownTimes: [], lastShow: 0, paused: false, drag: -1,
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
    case "started": $("status").textContent = `streaming (seed ${msg.seed})`; break;
    case "frames": state.modelFps = msg.fps; state.pendingFrames += msg.count;
                   $("status").textContent = `streaming: step ${msg.index}, ${msg.step_ms} ms/step`; break;
    case "ack": showControl(msg.control); break;
    case "text_ack": log(`caption -> "${msg.text}"`); break;
    case "error": log("error: " + msg.message); break;
  }
}

function setup(hello) {
  state.hello = hello;
  $("view").width = hello.width; $("view").height = hello.height;
  $("modelInfo").textContent = `control: ${hello.control_type}, ${hello.width}x${hello.height}`;
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
  state.format = $("format").value;
  state.queue = []; state.pendingFrames = 0;
  send({type: "start", image: state.image, text: $("caption").value,
        seed: parseInt($("seed").value || "0", 10), format: state.format});
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
async function onFrame(buf) {
  state.framesReceived++;
  const h = state.hello;
  let bitmap;
  if (state.format === "raw") {
    const rgb = new Uint8Array(buf);
    const rgba = new Uint8ClampedArray(h.width * h.height * 4);
    for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
      rgba[j] = rgb[i]; rgba[j + 1] = rgb[i + 1]; rgba[j + 2] = rgb[i + 2]; rgba[j + 3] = 255;
    }
    bitmap = new ImageData(rgba, h.width, h.height);
  } else {
    bitmap = await createImageBitmap(new Blob([buf], {type: "image/jpeg"}));
  }
  state.queue.push(bitmap);
}

// Frames arrive 4 at a time; show them evenly at the model's rate (or faster if we lag).
function display(now) {
  const interval = state.modelFps > 0 ? 1000 / state.modelFps : 0;
  const lag = state.queue.length > 8;
  if (state.queue.length && (now - state.lastShow >= interval * 0.9 || lag)) {
    const frame = state.queue.shift();
    const ctx = $("view").getContext("2d");
    if (frame instanceof ImageData) ctx.putImageData(frame, 0, 0);
    else ctx.drawImage(frame, 0, 0, $("view").width, $("view").height);
    state.lastShow = now;
    state.framesShown++;
    state.shownTimes.push(now);
    while (state.shownTimes.length && now - state.shownTimes[0] > 2000) state.shownTimes.shift();
  }
  const shownFps = state.shownTimes.length > 1
      ? (state.shownTimes.length - 1) * 1000 / (state.shownTimes[state.shownTimes.length - 1] - state.shownTimes[0])
      : 0;
  $("stats").textContent = `model: ${state.modelFps.toFixed(1)} fps | display: ${shownFps.toFixed(1)} fps | frames: ${state.framesShown}`;
  requestAnimationFrame(display);
}
requestAnimationFrame(display);

// -- camera keys ----------------------------------------------------------------------------
function keyName(e) { return e.key.length === 1 ? e.key.toLowerCase() : e.key.toLowerCase(); }

function sendKeys() {
  const keys = [...state.keys];
  $("keysHeld").textContent = "keys: " + (keys.length ? keys.join(" ") : "none");
  send({type: "control", keys: keys});
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
  if (now - lastPoseSend > 50) { lastPoseSend = now; send({type: "control", keypoints: state.pose}); }
});
window.addEventListener("mouseup", () => {
  if (state.drag >= 0) { send({type: "control", keypoints: state.pose}); state.drag = -1; drawOverlay(); }
});

connect();
