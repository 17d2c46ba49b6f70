"""A generator stand-in for the browser tests."""
import numpy as np


class ExactMotionStream:
  """The `StreamingGenerator` interface the server uses, without a model: every step moves the
  current frame by the commanded camera motion (pan and tilt, `torus.content_shift`: whole pixels,
  wrapping around), i.e. the torus world's oracle. The browser tests check with it that the
  page's keys, the server and the display turn a held key into content moving as commanded."""
  control_type = "camera"

  def __init__(self, height: int = 64, width: int = 64, fov_deg: float = 60.0):
    from apt2_jax.data import panorama
    from apt2_jax.inference import controls as controls_lib
    self.height, self.width, self.fov_deg = height, width, fov_deg
    self.focal = panorama.focal_px(width, fov_deg)
    self._controls = controls_lib.ControlInput("camera", 5, 1)
    self._frame = None

  def fork(self):
    return ExactMotionStream(self.height, self.width, self.fov_deg)

  def start(self, image, text=None, seed=0):
    from apt2_jax.inference.streaming import resize_image
    image = np.asarray(image, np.uint8)
    if image.shape[:2] != (self.height, self.width):
      image = resize_image(image, self.height, self.width)
    self._frame = image
    self._controls.reset()
    return image[None, None]

  def set_text(self, text):
    pass

  def step(self, control=None):
    from apt2_jax.data import torus
    raw = self._controls(control)
    raw = np.zeros((1, 4, 5), np.float32) if raw is None else np.asarray(raw)
    frames = []
    for shift in torus.content_shift(raw[0], self.focal):
      self._frame = torus.roll(self._frame, shift)
      frames.append(self._frame)
    return np.stack(frames)[None]

  def close(self):
    self._frame = None
