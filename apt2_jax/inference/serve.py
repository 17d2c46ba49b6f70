"""Interactive demo: one page, one WebSocket, the stream paced at a target video rate.

    python -m apt2_jax.inference.serve --checkpoint=DIR [--host=127.0.0.1 --port=8765 --fps=24]
    python -m apt2_jax.inference.serve --size=small --world=camera     # random weights

Open http://127.0.0.1:8765/, pick or upload a first frame, type a caption, press Start, then steer:
W/S forward/back, A/D or arrows pan, up/down tilt, Q/E roll, +/- zoom (camera models), or drag
the puppet's joints with the mouse (pose models). The page shows the model's fps, the displayed
fps, the key-to-frame latency and its frame queue.

Pacing (DESIGN.md, "Interactive streams are paced"): the stream is generated at `--fps` video
frames per second (24: 6 steps of 4 frames), or as fast as the model can when that is slower. A
client that acknowledges what it shows (the page) has at most one step in flight beyond the one
on screen: step n is generated once the client shows step n - 1, just in time for its display
(its 4 frames' duration after that acknowledgement, less the recent step time and a margin). A
client that does not acknowledge gets the stream at the target rate (the WebSocket's flow control
bounds what waits for it). A control applies to the next step generated after it arrives.

Examples (first frames with captions) come from the world the checkpoint was trained on (its run
config's `data.world`), picked as the evaluation picks its in-distribution worlds
(`evaluation.oracle.eval_worlds`); random weights and export bundles use `--world` (default: the
control type's world).

HTTP (same port): `/` the page, `/static/<file>`, `/examples.json`, `/examples/<name>.png`; the
WebSocket is at `/ws`.

Protocol (JSON text messages; frames are binary messages):
  server -> client
    {"type": "hello", "control_type", "height", "width", "keys": {key: [field, value]},
     "keypoints": [names], "bones": [[i, j]], "rest_pose": [[x, y]], "examples": [names],
     "world", "fps", "frames_per_step": 4, "formats": ["jpeg", "raw"], "max_upload_bytes"}
    {"type": "busy", "message"}           then close (code 1013): all sessions are taken
    {"type": "started", "seed", "text", "index": 0}   then the first frame (binary)
    {"type": "frames", "index", "count": 4, "control_seq", "step_ms", "fps", "in_flight"}
                                          then `count` binary frames: JPEG bytes, or raw RGB
                                          (height * width * 3 bytes). `control_seq`: the `seq` of
                                          the control message this step used (0: none yet);
                                          `fps`: the model's rate (4 / mean step time);
                                          `in_flight`: steps sent and not yet shown, this one
                                          included (acknowledging clients)
    {"type": "ack", "control": {...}, "seq"}  a control was accepted (applies from the next step);
                                          camera: {"camera": [5 floats per video frame]}
    {"type": "text_ack", "text"}          the prompt changes from the next step
    {"type": "error", "message"}          a bad message; the stream goes on unchanged
  client -> server
    {"type": "start", "image": "example:<name>" | "data:image/png;base64,...", "text": str,
     "seed": int, "format": "jpeg" | "raw", "ack": bool}   (re)starts the stream; "ack": true
                                          promises "shown" messages (paced by the display)
    {"type": "control", "keys": [...], "seq": int} | {"type": "control", "camera": [...]} |
    {"type": "control", "keypoints": [[x, y] * 15]} | {"type": "control"} (no control)
                                          held until the next control message; `seq` (optional,
                                          increasing) is echoed in the frames that use it
    {"type": "shown", "index": int}       the client shows the first frame of step `index`
                                          (0: the start frame)
    {"type": "text", "text": str}         changes the prompt mid-stream (visual cache kept)
    {"type": "pause"} / {"type": "resume"}
Uploads: PNG or JPEG only (checked by content), at most `max_upload_bytes` decoded and 4096 px a
side; messages above twice that are refused by the WebSocket layer (close 1009).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import logging
import mimetypes
import os
import threading
import time
from typing import Any, Optional

import numpy as np

from apt2_jax import media
from apt2_jax.inference import controls as controls_lib

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MAX_IMAGE_SIDE = 4096
MAX_TEXT_CHARS = 500
FRAMES_PER_STEP = 4  # video frames per generated step (one latent frame)

log = logging.getLogger("apt2_jax.serve")


class ClientError(ValueError):
  """A client's message is malformed; answered with {"type": "error"}, the stream continues."""


MAX_JSON_DEPTH = 32  # the protocol nests 3 levels; deeper messages are answered with an error


def _json_depth(value) -> int:
  """Nesting depth of parsed JSON, without recursion."""
  depth, stack = 0, [(value, 1)]
  while stack:
    v, d = stack.pop()
    if isinstance(v, (list, dict)):
      depth = max(depth, d)
      if d <= MAX_JSON_DEPTH:
        stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
  return depth


@dataclasses.dataclass
class ServerOptions:
  host: str = "127.0.0.1"
  port: int = 8765
  max_sessions: int = 1          # concurrent streams; further clients get "busy"
  max_upload_bytes: int = 2 << 20
  jpeg_quality: int = 85
  fps: float = 24.0              # target video frames per second (0: as fast as model and client allow)
  lead_margin_s: float = 0.04    # a step is generated this much (plus its recent time) before it is due


# ------------------------------------------------------------------------------------------------
# Uploads and examples
# ------------------------------------------------------------------------------------------------


def decode_upload(data_url: Any, max_bytes: int) -> np.ndarray:
  """A `data:image/...;base64,` URL -> uint8 [H, W, 3]; checks size, type (by content) and sides."""
  from PIL import Image
  if not isinstance(data_url, str) or not data_url.startswith("data:") or "," not in data_url:
    raise ClientError("image: expected 'example:<name>' or a data URL (data:image/png;base64,...)")
  header, payload = data_url.split(",", 1)
  if ";base64" not in header:
    raise ClientError("image: the data URL must be base64 encoded")
  if len(payload) > 4 * (max_bytes // 3 + 2):
    raise ClientError(f"image: upload larger than {max_bytes} bytes")
  try:
    raw = base64.b64decode(payload, validate=True)
  except (binascii.Error, ValueError):
    raise ClientError("image: invalid base64 data") from None
  if len(raw) > max_bytes:
    raise ClientError(f"image: upload of {len(raw)} bytes is larger than {max_bytes} bytes")
  if not (raw.startswith(b"\x89PNG\r\n\x1a\n") or raw.startswith(b"\xff\xd8\xff")):
    raise ClientError("image: only PNG and JPEG images are accepted")
  try:
    with Image.open(io.BytesIO(raw), formats=["PNG", "JPEG"]) as im:
      if max(im.size) > MAX_IMAGE_SIDE:
        raise ClientError(f"image: {im.size[0]}x{im.size[1]} is larger than {MAX_IMAGE_SIDE} px a side")
      return np.asarray(im.convert("RGB"))
  except ClientError:
    raise
  except Exception as e:  # PIL raises many kinds on corrupt data
    raise ClientError(f"image: cannot decode the image ({type(e).__name__})") from None


WORLD_OF_CONTROL = {"camera": "camera", "pose": "puppet", "none": "bouncing"}


def checkpoint_world(path: str) -> Optional[tuple[str, dict]]:
  """(world, `WorldConfig` overrides) of a training workdir's run config (`config.data.world`,
  `config.data.world_options`); None for an export bundle or a run that names no world."""
  if not path:
    return None
  try:
    from apt2_jax import checkpointing
    from apt2_jax.generation import bundle as bundle_lib
    if bundle_lib.is_bundle(os.path.abspath(path)) or not checkpointing.has_checkpoint(path):
      return None
    config = checkpointing.load_config(path)
  except Exception as e:  # an unreadable config: the control type's world
    log.warning("cannot read the run config of %s (%s); examples from the control type's world", path, e)
    return None
  data = config.get("data") or {}
  world = data.get("world") or config.get("world") or ""
  if not world:
    return None
  options = dict(data.get("world_options") or config.get("world_options") or {})
  return str(world), {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in options.items()}


def make_examples(world: str, height: int, width: int, count: int = 3,
                  options: Optional[dict] = None) -> dict:
  """{name: (uint8 [H, W, 3], caption)}: frame 0 of world `world`'s first `count` in-distribution
  evaluation worlds (`evaluation.oracle.eval_worlds`, their captions); a world name of
  `WORLD_OF_CONTROL` (a control type) is taken as its world. Fallback: colour ramps."""
  world = WORLD_OF_CONTROL.get(world, world)
  out = {}
  try:
    from apt2_jax.data import worlds
    from apt2_jax.evaluation import oracle
    frames = 5  # one latent step: every world's trajectory sampler accepts it
    env = worlds.make_world(world, worlds.WorldConfig(height=height, width=width, num_frames=frames,
                                                      **(options or {})))
    for tw in oracle.eval_worlds(env, oracle.IN_DISTRIBUTION, count, frames):
      first = oracle.render_oracle(env, tw.controls, tw.seed, 0, 1)[0]
      out[f"{world}_{tw.index}"] = (np.asarray(first, np.uint8), tw.caption)
  except Exception as e:  # the data and evaluation modules are optional for the demo
    log.warning("examples of the %r world unavailable (%s: %s); using gradient examples", world,
                type(e).__name__, e)
    out = {}
    y, x = np.mgrid[0:height, 0:width]
    for i in range(count):
      img = np.stack([(x * 255 // width + 80 * i) % 256, y * 255 // height,
                      ((x + y) * 127 // (height + width) + 60 * i) % 256], -1).astype(np.uint8)
      out[f"gradient_{i}"] = (img, "")
  return out


def png_bytes(image: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# One client's stream
# ------------------------------------------------------------------------------------------------


class Session:
  """A client's stream: its own generator state (a fork sharing parameters and compiled code).

  The event loop owns the fields; `start` and `step` run in a worker thread under `lock`.
  """

  def __init__(self, generator, options: ServerOptions, examples: dict):
    self.gen = generator.fork()
    self.options = options
    self.examples = examples
    self.control = None            # validated user control, held until replaced
    self.control_seq = 0           # the held control's `seq` (0: none yet)
    self.pending_text: Optional[str] = None
    self.started = False
    self.paused = False
    self.format = "jpeg"
    self.ack = False               # the client acknowledges the steps it shows
    self.steps = 0                 # steps generated since the start (the last one's index)
    self.shown = -1                # the latest step the client shows (0: the start frame)
    self.shown_at = 0.0            # when its acknowledgement arrived (perf_counter)
    self.last_step_at = 0.0        # when the last step was due (time pacing)
    self.epoch = 0                 # every (re)start: steps of an older stream are dropped
    self.step_times: list[float] = []
    self.lock = threading.Lock()   # the worker thread and the event loop share `gen`
    self.send_lock = asyncio.Lock()  # a frames message and its frames go out together
    self.wake = asyncio.Event()    # an acknowledgement, a (re)start or a resume

  def close(self):
    with self.lock:
      self.gen.close()
    self.started = False

  # -- messages (event loop) ------------------------------------------------------------------
  def parse(self, message) -> dict:
    if isinstance(message, bytes):
      raise ClientError("binary messages are not accepted; send JSON text")
    try:
      msg = json.loads(message)
    except json.JSONDecodeError as e:
      raise ClientError(f"message is not valid JSON ({e.msg} at {e.pos})") from None
    except RecursionError:  # json's recursion limit: "[[[[...]]]]" thousands deep
      raise ClientError(f"message is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    if _json_depth(msg) > MAX_JSON_DEPTH:
      raise ClientError(f"message is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
      raise ClientError("message must be a JSON object with a string 'type'")
    return msg

  def on_control(self, msg) -> dict:
    seq = msg.get("seq", None)
    if seq is not None and not _is_int(seq, 0, 2 ** 53):
      raise ClientError("seq: expected an integer in [0, 2^53)")
    body = {k: v for k, v in msg.items() if k not in ("type", "seq")}
    parsed = controls_lib.parse_control(body, self.gen.control_type, "control")
    self.control = None if parsed is None else (
        {"camera": parsed} if self.gen.control_type == "camera" else {"keypoints": parsed})
    self.control_seq = self.control_seq + 1 if seq is None else seq
    if parsed is None:
      return {"type": "ack", "control": None, "seq": self.control_seq}
    key = "camera" if self.gen.control_type == "camera" else "keypoints"
    return {"type": "ack", "control": {key: np.round(parsed[-1], 5).tolist()}, "seq": self.control_seq}

  def on_shown(self, msg) -> None:
    index = msg.get("index")
    if not _is_int(index, 0, 2 ** 53):
      raise ClientError("index: expected the integer index of a step")
    if self.started and self.shown < index <= self.steps:
      self.shown, self.shown_at = index, time.perf_counter()
      self.wake.set()

  def on_text(self, msg) -> dict:
    text = _text_field(msg)
    self.pending_text = text
    return {"type": "text_ack", "text": text}

  def start_request(self, msg):
    image = msg.get("image")
    if isinstance(image, str) and image.startswith("example:"):
      name = image[len("example:"):]
      if name not in self.examples:
        raise ClientError(f"image: unknown example {name!r}; known: {sorted(self.examples)}")
      image = self.examples[name][0]
    else:
      image = decode_upload(image, self.options.max_upload_bytes)
    seed = msg.get("seed", 0)
    if not _is_int(seed, 0, 2 ** 31):
      raise ClientError("seed: expected an integer in [0, 2^31)")
    fmt = msg.get("format", "jpeg")
    if fmt not in ("jpeg", "raw"):
      raise ClientError(f"format: expected 'jpeg' or 'raw', got {fmt!r:.40}")
    ack = msg.get("ack", False)
    if not isinstance(ack, bool):
      raise ClientError("ack: expected true or false")
    return image, _text_field(msg), seed, fmt, ack

  # -- pacing (event loop) ------------------------------------------------------------------------
  @property
  def interval(self) -> float:
    """Seconds of video per step at the target rate (0: unpaced)."""
    fps = self.options.fps
    return FRAMES_PER_STEP / fps if fps and fps > 0 else 0.0

  def wait_s(self, now: float) -> Optional[float]:
    """Seconds until the next step is due; 0: now; None: until woken (not started, paused, or the
    client has not shown the previous step yet)."""
    if not self.started or self.paused:
      return None
    interval = self.interval
    if self.ack:
      if self.shown < self.steps:  # at most one step beyond the one on screen
        return None
      lead = min(interval, self.options.lead_margin_s + 1.5 * max(self.step_times, default=0.0))
      due = self.shown_at + interval - lead
    else:
      due = self.last_step_at + interval
    return max(0.0, due - now)

  def mark_due(self, now: float) -> None:
    """A step begins now: the time-paced schedule moves on one interval (no bursts to catch up)."""
    due = self.last_step_at + self.interval
    self.last_step_at = due if now - due < 0.5 * self.interval else now

  def in_flight(self) -> Optional[int]:
    return self.steps - self.shown if self.ack else None

  # -- model work (worker thread) ---------------------------------------------------------------
  def start(self, image, text, seed, fmt, ack) -> list[bytes]:
    with self.lock:
      frame0 = self.gen.start(image, text=text, seed=seed)
      self.format, self.ack, self.paused = fmt, ack, False
      self.pending_text, self.steps, self.step_times = None, 0, []
      self.shown, self.shown_at, self.last_step_at = -1, 0.0, time.perf_counter()
      self.started = True
    return [self._encode(frame0[0, 0])]

  def step(self, epoch: int, control, control_seq: int) -> Optional[tuple[dict, list[bytes]]]:
    """The next step with `control` (captured when it began); None when a restart overtook it."""
    t0 = time.perf_counter()
    with self.lock:
      if epoch != self.epoch or not self.started:
        return None
      if self.pending_text is not None:
        self.gen.set_text(self.pending_text)
        self.pending_text = None
      frames = self.gen.step(control)[0]
      encoded = [self._encode(f) for f in frames]
      self.steps += 1
      index = self.steps
    dt = time.perf_counter() - t0
    self.step_times = (self.step_times + [dt])[-20:]
    mean = float(np.mean(self.step_times))
    meta = {"type": "frames", "index": index, "count": len(encoded), "control_seq": control_seq,
            "step_ms": round(1000 * dt, 1), "fps": round(len(encoded) / mean, 2)}
    return meta, encoded

  def _encode(self, frame: np.ndarray) -> bytes:
    if self.format == "raw":
      return np.ascontiguousarray(frame, np.uint8).tobytes()
    return media.encode_jpeg(frame, self.options.jpeg_quality)


def _is_int(value, lo: int, hi: int) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and lo <= value < hi


def _text_field(msg) -> str:
  text = msg.get("text", "")
  if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
    raise ClientError(f"text: expected a string of at most {MAX_TEXT_CHARS} characters")
  return text


# ------------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------------


class DemoServer:
  """WebSocket + static page server around a `StreamingGenerator`.

  `await server.serve()` in an event loop, or `server.start_in_thread()` (tests); `stop()`.
  `active_sessions` counts connected streams.
  """

  def __init__(self, generator, options: ServerOptions = ServerOptions(), examples=None,
               announce: bool = False, world: Optional[str] = None, world_options: Optional[dict] = None):
    self.generator = generator
    self.announce = announce
    self.options = options
    self.world = WORLD_OF_CONTROL.get(world or generator.control_type, world or "")
    self.examples = examples if examples is not None else make_examples(
        self.world, generator.height, generator.width, options=world_options)
    self.active_sessions = 0
    self.sessions: list[Session] = []  # the connected clients' sessions (tests read their pacing)
    self._loop: Optional[asyncio.AbstractEventLoop] = None
    self._server = None
    self._thread: Optional[threading.Thread] = None
    self._ready = threading.Event()
    self.port = options.port

  # -- HTTP ------------------------------------------------------------------------------------
  def hello(self) -> dict:
    return {
        "type": "hello", "control_type": self.generator.control_type,
        "height": self.generator.height, "width": self.generator.width,
        "keys": {k: list(v) for k, v in controls_lib.KEY_BINDINGS.items()},
        "keypoints": list(_keypoint_names()), "bones": [list(b) for b in _bones()],
        "rest_pose": controls_lib.REST_POSE.tolist(),
        "examples": [{"name": n, "caption": c} for n, (_, c) in self.examples.items()],
        "world": self.world, "fps": self.options.fps, "frames_per_step": FRAMES_PER_STEP,
        "formats": ["jpeg", "raw"], "max_upload_bytes": self.options.max_upload_bytes,
    }

  def process_request(self, connection, request):
    from websockets.datastructures import Headers
    from websockets.http11 import Response
    path = request.path.split("?", 1)[0]
    if path == "/ws":
      return None  # the WebSocket handshake goes on

    def respond(status, body: bytes, ctype: str):
      headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))),
                         ("Cache-Control", "no-store")])
      reason = {200: "OK", 404: "Not Found"}[status]
      return Response(status, reason, headers, body)

    if path in ("/", "/index.html"):
      path = "/static/index.html"
    if path.startswith("/static/"):
      name = path[len("/static/"):]
      full = os.path.join(STATIC_DIR, name)
      if "/" in name or name.startswith(".") or not os.path.isfile(full):
        return respond(404, b"not found", "text/plain")
      with open(full, "rb") as f:
        ctype = mimetypes.guess_type(full)[0] or "application/octet-stream"
        return respond(200, f.read(), ctype + ("; charset=utf-8" if ctype.startswith("text/") or ctype.endswith("javascript") else ""))
    if path == "/examples.json":
      return respond(200, json.dumps(self.hello()["examples"]).encode(), "application/json")
    if path.startswith("/examples/") and path.endswith(".png"):
      name = path[len("/examples/"):-len(".png")]
      if name in self.examples:
        return respond(200, png_bytes(self.examples[name][0]), "image/png")
    return respond(404, b"not found", "text/plain")

  # -- WebSocket -------------------------------------------------------------------------------
  async def handler(self, ws):
    if self.active_sessions >= self.options.max_sessions:
      await ws.send(json.dumps({"type": "busy", "message":
                                f"the server is busy: {self.active_sessions} of "
                                f"{self.options.max_sessions} streams in use; try again later"}))
      await ws.close(1013, "busy")
      return
    self.active_sessions += 1
    session = Session(self.generator, self.options, self.examples)
    self.sessions.append(session)
    producer = None
    try:
      await ws.send(json.dumps(self.hello()))
      producer = asyncio.create_task(self._produce(ws, session))
      async for message in ws:
        try:
          msg = session.parse(message)
          kind = msg["type"]
          if kind == "shown":
            session.on_shown(msg)
          elif kind == "control":
            await ws.send(json.dumps(session.on_control(msg)))
          elif kind == "text":
            await ws.send(json.dumps(session.on_text(msg)))
          elif kind == "start":
            request = session.start_request(msg)
            session.epoch += 1       # steps of the stream before are dropped
            session.started = False  # the producer stops stepping while we restart
            frames = await asyncio.to_thread(session.start, *request)
            async with session.send_lock:
              await ws.send(json.dumps({"type": "started", "seed": request[2], "text": request[1], "index": 0}))
              for f in frames:
                await ws.send(f)
            session.wake.set()
          elif kind == "pause":
            session.paused = True
          elif kind == "resume":
            session.paused = False
            session.wake.set()
          else:
            raise ClientError(f"unknown message type {kind!r:.40}; expected start, control, "
                              f"shown, text, pause or resume")
        except (ClientError, controls_lib.ControlError) as e:
          await ws.send(json.dumps({"type": "error", "message": str(e)}))
    except Exception as e:  # a closed connection ends the session; anything else is logged
      import websockets
      if not isinstance(e, websockets.ConnectionClosed):
        log.exception("session failed")
    finally:
      if producer is not None:
        producer.cancel()
        try:
          await producer
        except (asyncio.CancelledError, Exception):
          pass
      await asyncio.to_thread(session.close)
      self.sessions.remove(session)
      self.active_sessions -= 1

  async def _produce(self, ws, session: Session):
    """Generates the session's steps when they are due (`Session.wait_s`) and sends them."""
    while True:
      session.wake.clear()
      wait = session.wait_s(time.perf_counter())
      if wait is None or wait > 0:
        try:
          await asyncio.wait_for(session.wake.wait(), wait)
        except asyncio.TimeoutError:
          pass
        continue
      session.mark_due(time.perf_counter())
      epoch = session.epoch
      out = await asyncio.to_thread(session.step, epoch, session.control, session.control_seq)
      if out is None or epoch != session.epoch:
        continue  # a restart overtook this step
      meta, frames = out
      meta["in_flight"] = session.in_flight()
      async with session.send_lock:
        await ws.send(json.dumps(meta))
        for f in frames:
          await ws.send(f)

  # -- lifecycle -------------------------------------------------------------------------------
  async def serve(self, stop: Optional[asyncio.Future] = None):
    from websockets.asyncio.server import serve
    max_size = 2 * self.options.max_upload_bytes + 4096
    async with serve(self.handler, self.options.host, self.options.port, max_size=max_size,
                     process_request=self.process_request) as server:
      self._server = server
      self.port = server.sockets[0].getsockname()[1]
      self._loop = asyncio.get_running_loop()
      self._stop = stop or self._loop.create_future()
      self._ready.set()
      if self.announce:
        log.info("serving the %s stream (%dx%d, examples of the %s world, %s) on %s", self.generator.control_type,
                 self.generator.height, self.generator.width, self.world or "?",
                 f"{self.options.fps:g} fps" if self.options.fps > 0 else "unpaced", self.url)
      await self._stop

  def start_in_thread(self) -> "DemoServer":
    self._thread = threading.Thread(target=lambda: asyncio.run(self.serve()), daemon=True)
    self._thread.start()
    if not self._ready.wait(60):
      raise RuntimeError("the demo server did not start")
    return self

  def stop(self):
    if self._loop is not None:
      self._loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
    if self._thread is not None:
      self._thread.join(30)

  @property
  def url(self) -> str:
    return f"http://{self.options.host}:{self.port}/"


def _world_control(world: str) -> str:
  from apt2_jax import controls as encodings
  return encodings.WORLD_CONTROL_TYPES.get(world, "camera")


def _keypoint_names():
  try:
    from apt2_jax.data import worlds
    return worlds.PUPPET_KEYPOINTS
  except ImportError:
    return tuple(f"joint_{i}" for i in range(controls_lib.NUM_KEYPOINTS))


def _bones():
  try:
    from apt2_jax.data import worlds
    return worlds.PUPPET_BONES
  except ImportError:
    return ()


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def build_generator(checkpoint: str, size: str, control: str, height: int, width: int,
                    decoder: str = ""):
  """From a checkpoint, or random weights of an `apt2_jax.configs.sizes` size."""
  from apt2_jax.inference.streaming import StreamingGenerator
  if checkpoint:
    kwargs = {k: v for k, v in (("height", height), ("width", width)) if v}
    try:  # a damaged newest checkpoint falls back to an older step (checkpointing.newest_intact)
      return StreamingGenerator.from_checkpoint(checkpoint, decoder=decoder or None, **kwargs)
    except FileNotFoundError as e:
      from absl import app
      raise app.UsageError(f"--checkpoint={checkpoint}: {e}") from None
  from apt2_jax.configs import sizes
  from apt2_jax.models import DiTConfig
  from apt2_jax.models import vae as vae_lib
  from apt2_jax import controls as encodings
  # The layout new models train with: camera ray maps, pose keypoint maps (`apt2_jax.controls`).
  channels = encodings.control_channels(encodings.default_encoding(control), encodings.CONTROL_DIM[control])
  config = DiTConfig.from_dict(sizes.model_config(size, control_channels=channels))
  vae_size = "tiny" if size == "tiny" else "small"
  return StreamingGenerator.random(config, vae_lib.vae_config(vae_size), control_type=control,
                                   height=height or 64, width=width or 64)


def main(argv):
  from absl import app, flags
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from apt2_jax import runtime
  runtime.require_local_paths("checkpoint")
  runtime.setup()  # absl logging (its handler also carries this module's records), compilation cache
  if FLAGS.text_encoder:  # caption strings -> umT5 embeddings for models that take embeddings
    from apt2_jax.generation import prompt
    prompt.set_text_encoder(FLAGS.text_encoder)
  world, world_options = FLAGS.world, None
  if FLAGS.world:
    from apt2_jax.data import worlds
    if FLAGS.world not in worlds.WORLD_NAMES:
      raise app.UsageError(f"--world={FLAGS.world}: expected one of {worlds.WORLD_NAMES}")
  if FLAGS.checkpoint:
    gen = build_generator(FLAGS.checkpoint, FLAGS.size, FLAGS.control or "", FLAGS.height, FLAGS.width,
                          FLAGS.decoder)
    if not world:
      world, world_options = checkpoint_world(FLAGS.checkpoint) or ("", None)
  else:
    control = FLAGS.control or (_world_control(world) if world else "camera")
    if world and _world_control(world) != control:
      raise app.UsageError(f"--world={world} is a {_world_control(world)!r} world; --control={control} "
                           f"needs a {control!r} world")
    gen = build_generator("", FLAGS.size, control, FLAGS.height, FLAGS.width, FLAGS.decoder)
  if world and _world_control(world) != gen.control_type:
    log.warning("the %r world is a %r world, the model a %r model; examples of the %r world instead",
                world, _world_control(world), gen.control_type, WORLD_OF_CONTROL[gen.control_type])
    world, world_options = "", None
  options = ServerOptions(host=FLAGS.host, port=FLAGS.port, max_sessions=FLAGS.max_sessions,
                          max_upload_bytes=FLAGS.max_upload_bytes, jpeg_quality=FLAGS.jpeg_quality,
                          fps=FLAGS.fps)
  server = DemoServer(gen, options, announce=True, world=world or None, world_options=world_options)
  if FLAGS.warmup:
    log.info("compiling the stream (first frame, one step)...")
    warm = gen.fork()
    warm.start(next(iter(server.examples.values()))[0], text="", seed=0)
    warm.step(None)
    warm.close()
  asyncio.run(server.serve())


def _define_flags():
  from absl import flags
  from apt2_jax import runtime
  runtime.define_flags()
  flags.DEFINE_string("checkpoint", "", "export bundle or training workdir (empty: random weights)")
  flags.DEFINE_string("decoder", "", "light decoder workdir (experiments/vae.py:light_decoder) replacing "
                      "the VAE's decoder")
  flags.DEFINE_string("size", "small", "model size for random weights (apt2_jax/configs/sizes.py)")
  flags.DEFINE_enum("control", None, ["none", "camera", "pose"], "control of random weights (default: "
                    "--world's, else camera)")
  flags.DEFINE_string("world", "", "the world of the example first frames (apt2_jax.data.worlds; default: "
                      "the checkpoint's run config's, else the control type's)")
  flags.DEFINE_float("fps", 24.0, "target video frames per second (4 per step; 0: as fast as the model "
                     "and the page allow)")
  flags.DEFINE_integer("height", 0, "pixel height (0: the checkpoint's, or 64)")
  flags.DEFINE_integer("width", 0, "pixel width (0: the checkpoint's, or 64)")
  flags.DEFINE_string("host", "127.0.0.1", "bind address (127.0.0.1: this machine only)")
  flags.DEFINE_integer("port", 8765, "port of the page and the WebSocket (0: any free port)")
  flags.DEFINE_integer("max_sessions", 1, "concurrent streams; more clients are told 'busy'")
  flags.DEFINE_integer("max_upload_bytes", 2 << 20, "largest accepted first-frame upload")
  flags.DEFINE_integer("jpeg_quality", 85, "JPEG quality of streamed frames")
  flags.DEFINE_bool("warmup", True, "compile before accepting clients")
  flags.DEFINE_string("text_encoder", None, "umT5 text encoder for prompts of Wan-size models: a Wan2.1 "
                      "diffusers folder (text_encoder/, tokenizer/) or an encoder folder (generation.prompt)")


if __name__ == "__main__":
  from apt2_jax import cli
  _define_flags()
  cli.run(main)  # bad inputs: one line and exit status 1
