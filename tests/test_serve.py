"""The demo server over a real WebSocket on 127.0.0.1: page, stream, bad messages, busy, disconnect."""
import asyncio
import base64
import io
import json
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
