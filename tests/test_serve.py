"""The demo server over a real WebSocket on 127.0.0.1: page, stream, bad messages, busy, disconnect."""
import asyncio
import base64
import io
import json
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from apt2_jax.inference import serve
from test_inference import tiny_generator

TIMEOUT = 120  # seconds for any single receive (the first step compiles on a loaded 2-core CPU)


@pytest.fixture(scope="module")
def server():
  gen = tiny_generator()
  examples = {"grad": (np.full((gen.height, gen.width, 3), 120, np.uint8), "a camera drifts over grass")}
  s = serve.DemoServer(gen, serve.ServerOptions(port=0, max_sessions=1, max_upload_bytes=20_000),
                       examples=examples).start_in_thread()
  yield s
  s.stop()


def _run(coro):
  return asyncio.run(asyncio.wait_for(coro, 4 * TIMEOUT))


async def _recv_json(ws, type_, limit=50):
  """Next JSON message of `type_` (skipping frames and others), bounded."""
  for _ in range(limit):
    msg = await asyncio.wait_for(ws.recv(), TIMEOUT)
    if isinstance(msg, str):
      data = json.loads(msg)
      if data["type"] == type_:
        return data
  raise AssertionError(f"no {type_!r} message in {limit} messages")


async def _recv_frames(ws, n, limit=200):
  """The next `n` binary frames, bounded; returns (frames, json messages seen)."""
  frames, seen = [], []
  for _ in range(limit):
    msg = await asyncio.wait_for(ws.recv(), TIMEOUT)
    if isinstance(msg, bytes):
      frames.append(msg)
      if len(frames) == n:
        return frames, seen
    else:
      seen.append(json.loads(msg))
  raise AssertionError(f"got {len(frames)} of {n} frames in {limit} messages")


def _png_data_url(image):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_page_and_examples_over_http(server):
  page = urllib.request.urlopen(server.url, timeout=10).read().decode()
  assert "<canvas id=\"view\"" in page and "/static/app.js" in page
  assert b"new WebSocket" in urllib.request.urlopen(server.url + "static/app.js", timeout=10).read()
  png = urllib.request.urlopen(server.url + "examples/grad.png", timeout=10).read()
  assert png.startswith(b"\x89PNG")
  with pytest.raises(urllib.error.HTTPError, match="404"):
    urllib.request.urlopen(server.url + "static/..%2Fserve.py", timeout=10)


def test_stream_controls_errors_busy_and_disconnect(server):
  from websockets.asyncio.client import connect
  uri = f"ws://127.0.0.1:{server.port}/ws"

  async def scenario():
    async with connect(uri) as ws:
      hello = await _recv_json(ws, "hello")
      assert hello["control_type"] == "camera" and hello["height"] == 32
      assert server.active_sessions == 1
      # A second client is told "busy" and closed while the first one streams on.
      async with connect(uri) as other:
        busy = json.loads(await asyncio.wait_for(other.recv(), TIMEOUT))
        assert busy["type"] == "busy" and "busy" in busy["message"]
        await asyncio.wait_for(other.wait_closed(), TIMEOUT)
        assert other.close_code == 1013
      # Bad uploads are refused with a message.
      await ws.send(json.dumps({"type": "start", "image": "data:image/gif;base64,R0lGODlh"}))
      assert "only PNG and JPEG" in (await _recv_json(ws, "error"))["message"]
      big = np.random.default_rng(0).integers(0, 255, (90, 90, 3), dtype=np.uint8)  # ~24 kB PNG
      await ws.send(json.dumps({"type": "start", "image": _png_data_url(big)}))
      assert "larger than 20000 bytes" in (await _recv_json(ws, "error"))["message"]
      # Start from an uploaded PNG (raw frames).
      image = np.zeros((48, 40, 3), np.uint8) + np.arange(40, dtype=np.uint8)[None, :, None] * 5
      await ws.send(json.dumps({"type": "start", "image": _png_data_url(image), "text": "a camera glides over sand",
                                "seed": 1, "format": "raw"}))
      frames, _ = await _recv_frames(ws, 1 + 4)
      assert all(len(f) == 32 * 32 * 3 for f in frames)
      # Malformed and out-of-range controls: an error naming the entry, and the stream continues.
      await ws.send(json.dumps({"type": "control", "camera": [0, 0, 0, 5.0, 0]}))
      assert "control.camera[3]: 5 is outside [-0.25, 0.25] (forward)" in (await _recv_json(ws, "error"))["message"]
      await ws.send("{not json")
      assert "not valid JSON" in (await _recv_json(ws, "error"))["message"]
      # Deeply nested JSON (past json's recursion limit, or just deep): answered, the session stays.
      await ws.send("[" * 5000 + "]" * 5000)
      assert "nested too deeply (at most 32 levels)" in (await _recv_json(ws, "error"))["message"]
      await ws.send(json.dumps({"type": "control", "camera": json.loads("[" * 40 + "]" * 40)}))
      assert "nested too deeply" in (await _recv_json(ws, "error"))["message"]
      await ws.send(json.dumps({"type": "control", "keys": ["w", "F13"]}))
      assert "control.keys[1]: unknown key 'F13'" in (await _recv_json(ws, "error"))["message"]
      await ws.send(json.dumps({"type": "teleport"}))
      assert "unknown message type 'teleport'" in (await _recv_json(ws, "error"))["message"]
      await ws.send(json.dumps({"type": "control", "keys": ["w"]}))
      ack = await _recv_json(ws, "ack")
      assert ack["control"]["camera"][3] == pytest.approx(0.125)
      await ws.send(json.dumps({"type": "text", "text": "a camera circles over sand"}))
      assert (await _recv_json(ws, "text_ack"))["text"] == "a camera circles over sand"
      frames, seen = await _recv_frames(ws, 8)
      stats = [m for m in seen if m["type"] == "frames"]
      assert stats and stats[-1]["fps"] > 0
    # The disconnected client's session is freed; a new client gets a stream (JPEG).
    for _ in range(100):
      if server.active_sessions == 0:
        break
      await asyncio.sleep(0.1)
    assert server.active_sessions == 0
    async with connect(uri) as ws:
      await _recv_json(ws, "hello")
      await ws.send(json.dumps({"type": "start", "image": "example:grad", "format": "jpeg"}))
      frames, _ = await _recv_frames(ws, 5)
      decoded = np.asarray(Image.open(io.BytesIO(frames[-1])))
      assert decoded.shape == (32, 32, 3)

  _run(scenario())


def test_decode_upload_checks():
  with pytest.raises(serve.ClientError, match="expected 'example:<name>' or a data URL"):
    serve.decode_upload(3, 1000)
  with pytest.raises(serve.ClientError, match="invalid base64"):
    serve.decode_upload("data:image/png;base64,@@@", 1000)
  with pytest.raises(serve.ClientError, match="cannot decode"):
    serve.decode_upload("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nrubbish").decode(), 1000)
  img = serve.decode_upload(_png_data_url(np.zeros((8, 8, 3), np.uint8)), 1000)
  assert img.shape == (8, 8, 3)


def test_two_sessions_when_configured():
  from websockets.asyncio.client import connect
  gen = tiny_generator()
  examples = {"grad": (np.full((gen.height, gen.width, 3), 60, np.uint8), "")}
  s = serve.DemoServer(gen, serve.ServerOptions(port=0, max_sessions=2), examples=examples).start_in_thread()
  uri = f"ws://127.0.0.1:{s.port}/ws"

  async def scenario():
    async with connect(uri) as a, connect(uri) as b:
      for ws, seed in ((a, 1), (b, 2)):
        await _recv_json(ws, "hello")
        await ws.send(json.dumps({"type": "start", "image": "example:grad", "seed": seed, "format": "raw"}))
      fa, _ = await _recv_frames(a, 5)
      fb, _ = await _recv_frames(b, 5)
      assert fa[0] == fb[0] and fa[-1] != fb[-1]  # same first frame, own noise streams
      assert s.active_sessions == 2
  try:
    _run(scenario())
  finally:
    s.stop()


# ------------------------------------------------------------------------------------------------
# Pacing (DESIGN.md, "Interactive streams are paced")
# ------------------------------------------------------------------------------------------------


class _FakeGenerator:
  """The generator interface the server uses, without a model (the schedule's unit test)."""
  control_type, height, width = "camera", 16, 16

  def fork(self):
    return self

  def start(self, image, text=None, seed=0):
    return np.zeros((1, 1, 16, 16, 3), np.uint8)

  def set_text(self, text):
    pass

  def step(self, control=None):
    return np.zeros((1, 4, 16, 16, 3), np.uint8)

  def close(self):
    pass


def test_pacing_schedule():
  """`Session.wait_s`: time-paced without acknowledgements; with them, step n waits for step n - 1
  to be shown, then is due one step's duration after that, less the lead."""
  async def scenario():
    options = serve.ServerOptions(fps=24.0, lead_margin_s=0.04)
    s = serve.Session(_FakeGenerator(), options, {})
    assert s.interval == pytest.approx(4 / 24) and s.wait_s(0.0) is None  # not started
    # A client that does not acknowledge: one step per interval, no bursts after a stall.
    s.start(np.zeros((16, 16, 3), np.uint8), "", 0, "raw", False)
    t0 = s.last_step_at
    assert s.wait_s(t0) == pytest.approx(4 / 24)
    assert s.wait_s(t0 + 0.2) == 0
    s.mark_due(t0 + 0.17)
    assert s.last_step_at == pytest.approx(t0 + 4 / 24)
    s.mark_due(t0 + 5.0)  # far behind: the schedule restarts from now
    assert s.last_step_at == pytest.approx(t0 + 5.0)
    # An acknowledging client: nothing until the start frame is shown.
    s.start(np.zeros((16, 16, 3), np.uint8), "", 0, "raw", True)
    assert s.wait_s(time.perf_counter()) is None
    s.on_shown({"index": 0})
    t = s.shown_at
    assert s.wait_s(t) == pytest.approx(4 / 24 - 0.04)  # no step time measured yet: the margin
    meta, frames = s.step(s.epoch, None, 0)
    assert meta["index"] == 1 and len(frames) == 4 and s.in_flight() == 1
    assert s.wait_s(t + 10) is None                     # step 1 is not shown yet: at most one in flight
    s.on_shown({"index": 5})                            # not sent yet: ignored
    s.on_shown({"index": 0})                            # already known: ignored
    assert s.shown == 0 and s.wait_s(t + 10) is None
    s.on_shown({"index": 1})
    lead = 0.04 + 1.5 * max(s.step_times)
    assert s.in_flight() == 0 and s.wait_s(s.shown_at) == pytest.approx(max(0.0, 4 / 24 - lead))
    with pytest.raises(serve.ClientError, match="index"):
      s.on_shown({"index": "1"})
    # A model slower than the target: the lead is the whole interval, the next step starts at once.
    s.step_times = [1.0]
    assert s.wait_s(s.shown_at) == 0
    # Pause, restart: a step of the stream before is dropped.
    s.paused = True
    assert s.wait_s(t + 10) is None
    s.paused = False
    epoch = s.epoch
    s.epoch += 1
    assert s.step(epoch, None, 0) is None
    # Controls: a client's `seq` is echoed; without one the server counts.
    assert s.on_control({"type": "control", "keys": ["d"], "seq": 7})["seq"] == 7 and s.control_seq == 7
    assert s.on_control({"type": "control"})["seq"] == 8 and s.control is None
    with pytest.raises(serve.ClientError, match="seq"):
      s.on_control({"type": "control", "seq": True})
  asyncio.run(scenario())


async def _display_client(ws, seconds: float, fps: float, controls=(), ack=True, show=True):
  """A page stand-in: shows frames at `fps` (acknowledging each step's first frame when `ack`),
  sends the `controls` (keys at times after the first frame) and records what a user sees.
  Returns the frames messages [(time received, meta)], the queue length after each frame received,
  the latencies (control sent -> first frame using it shown) and the number of frames shown."""
  queue, frames_meta, queue_lengths, sent, latencies = [], [], [], {}, []
  incoming = {"left": 0}
  shown = 0
  t_end = None
  interval = 1.0 / fps

  async def reader():
    async for msg in ws:
      now = time.perf_counter()
      if isinstance(msg, bytes):
        if incoming["left"] > 0:
          first = incoming["left"] == incoming["count"]
          incoming["left"] -= 1
          queue.append((incoming["index"], first, incoming["seq"]))
          queue_lengths.append(len(queue))
        continue
      data = json.loads(msg)
      if data["type"] == "started":
        incoming.update(index=0, count=1, left=1, seq=0)
      elif data["type"] == "frames":
        incoming.update(index=data["index"], count=data["count"], left=data["count"], seq=data["control_seq"])
        frames_meta.append((now, data))

  task = asyncio.create_task(reader())
  try:
    while not queue:
      await asyncio.sleep(0.002)
    t0 = time.perf_counter()
    t_end = t0 + seconds
    pending = sorted(controls)
    next_due = t0
    seq = 0
    while time.perf_counter() < t_end:
      now = time.perf_counter()
      while pending and now - t0 >= pending[0][0]:
        seq += 1
        sent[seq] = now
        await ws.send(json.dumps({"type": "control", "keys": pending.pop(0)[1], "seq": seq}))
      if show and queue and now >= next_due:
        index, first, used = queue.pop(0)
        shown += 1
        next_due = now + interval if now - next_due > interval else next_due + interval
        if first:
          if ack:
            await ws.send(json.dumps({"type": "shown", "index": index}))
          for s in [s for s in sent if s <= used]:
            latencies.append(now - sent.pop(s))
      await asyncio.sleep(0.003)
  finally:
    task.cancel()
  return frames_meta, queue_lengths, latencies, shown


def _paced_server(fps):
  gen = tiny_generator()
  examples = {"grad": (np.full((gen.height, gen.width, 3), 120, np.uint8), "")}
  return serve.DemoServer(gen, serve.ServerOptions(port=0, fps=fps), examples=examples).start_in_thread()


def _steps_per_s(frames_meta, skip_s=0.5):
  """Steps per second received after the first `skip_s` seconds."""
  times = [t for t, _ in frames_meta]
  times = [t for t in times if t >= times[0] + skip_s]
  return (len(times) - 1) / (times[-1] - times[0])


@pytest.mark.parametrize("ack", [True, False], ids=["acknowledged", "time_paced"])
def test_stream_is_paced_at_the_target_rate(ack):
  """24 fps = 6 steps/s whatever the model's rate; with acknowledgements at most one step is in
  flight beyond the one shown (the client's queue holds at most 7 frames), and a held key reaches
  the screen within 2 steps + 100 ms; a client that stops showing frames stops the stream."""
  from websockets.asyncio.client import connect
  server = _paced_server(24.0)

  async def scenario():
    async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
      await _recv_json(ws, "hello")
      await ws.send(json.dumps({"type": "start", "image": "example:grad", "format": "raw", "ack": ack}))
      keys = [(1.0 + 0.37 * i, ["d"] if i % 2 == 0 else []) for i in range(6)]
      frames_meta, queue_lengths, latencies, shown = await _display_client(ws, 4.0, 24.0, keys, ack=ack)
      model_fps = float(np.median([m["fps"] for _, m in frames_meta]))
      rate = _steps_per_s(frames_meta)
      print(f"ack={ack}: model {model_fps:.0f} fps, {rate:.2f} steps/s, queue max {max(queue_lengths)}, "
            f"latency ms {sorted(round(1000 * x) for x in latencies)}")
      assert rate <= 6 * 1.1, rate                    # never the model's rate
      assert rate >= 0.75 * min(6.0, model_fps / 4), (rate, model_fps)
      seqs = [m["control_seq"] for _, m in frames_meta]
      assert seqs == sorted(seqs) and seqs[-1] == 6   # every control reached a step, in order
      assert len(latencies) == 6
      if ack:
        assert all(m["in_flight"] == 1 for _, m in frames_meta), [m["in_flight"] for _, m in frames_meta]
        assert max(queue_lengths) <= 7
        if model_fps >= 4 * 24:
          assert max(latencies) <= 2 * 4 / 24 + 0.1, latencies
        # A client that shows nothing more gets nothing more: one step in flight, then silence.
        got = 0
        try:
          while True:
            msg = await asyncio.wait_for(ws.recv(), 1.0)
            got += isinstance(msg, str) and json.loads(msg)["type"] == "frames"
        except asyncio.TimeoutError:
          pass
        assert got <= 1, got
      else:
        assert all(m["in_flight"] is None for _, m in frames_meta)
  try:
    _run(scenario())
  finally:
    server.stop()


def test_stream_runs_at_the_model_rate_when_slower_than_the_target():
  """--fps far above the model's rate: the acknowledged stream goes as fast as the model can."""
  from websockets.asyncio.client import connect
  server = _paced_server(10_000.0)

  async def scenario():
    async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
      await _recv_json(ws, "hello")
      await ws.send(json.dumps({"type": "start", "image": "example:grad", "format": "raw", "ack": True}))
      frames_meta, queue_lengths, _, _ = await _display_client(ws, 2.0, 10_000.0)
      rate = _steps_per_s(frames_meta)
      model_steps = float(np.median([m["fps"] for _, m in frames_meta])) / 4
      print(f"model {model_steps:.1f} steps/s, streamed {rate:.1f} steps/s")
      assert rate >= 0.4 * model_steps, (rate, model_steps)
      assert all(m["in_flight"] == 1 for _, m in frames_meta) and max(queue_lengths) <= 7
  try:
    _run(scenario())
  finally:
    server.stop()
