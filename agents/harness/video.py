"""Videos of evaluation episodes (``--capture-video``): H.264 mp4 files written with PyAV.

PyAV is the optional ``video`` extra (``pip install -e ".[video]"``); its wheels carry their
own ffmpeg, so nothing else is needed.  One frame per decision of the agent:

- Atari: the raw RGB screen (210x160) the agent acted on, at 15 frames per second (the
  game's 60 Hz over the frame skip of 4); the 84x84 frame where no screen is reachable.
- image MDP: the observation, enlarged, above a band with the agent's answer (green when
  it names the label, red when not) and, on the right in grey, the label.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

MISSING = '--capture-video needs PyAV (an mp4 writer that ships its own ffmpeg): pip install -e ".[video]"'
ATARI_FPS = 15
IMAGE_MDP_FPS = 4

_GREEN, _RED, _GREY = (40, 200, 60), (220, 40, 40), (150, 150, 150)
_BAND = 48  # pixels under an image-MDP observation
_FONT = {  # 3x5 digits
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
}


def available() -> bool:
    """Whether PyAV is installed (``--capture-video`` checks it before any work)."""
    return importlib.util.find_spec("av") is not None


class VideoWriter:
    """RGB frames [H, W, 3] uint8 into an mp4, encoded as they come (a whole Atari game can be 27k frames).

    The file appears only at ``close()`` (written under a temporary name, then renamed).
    """

    def __init__(self, path: str | os.PathLike, fps: int):
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.stem}.tmp{os.getpid()}.mp4")
        self._av = av
        self._container = av.open(str(self._tmp), "w")
        self._fps = int(fps)
        self._stream = None
        self.frames = 0

    def add(self, frame: np.ndarray) -> None:
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        if frame.ndim == 2:
            frame = np.repeat(frame[:, :, None], 3, axis=2)
        # yuv420p needs even sides: repeat the last row/column where one is odd.
        frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), mode="edge")
        if self._stream is None:
            self._stream = self._container.add_stream("libx264", rate=self._fps)
            self._stream.height, self._stream.width = frame.shape[:2]
            self._stream.pix_fmt = "yuv420p"
        for packet in self._stream.encode(self._av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> Path | None:
        """Finish the file; returns its path (None, and no file, when no frame was added)."""
        if self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()
        if self._stream is None:
            self._tmp.unlink(missing_ok=True)
            return None
        os.replace(self._tmp, self.path)
        return self.path


def count_frames(path: str | os.PathLike) -> int:
    """The number of frames an mp4 decodes to (for checks and tests)."""
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def _draw_number(canvas: np.ndarray, number: int, x: int, y: int, scale: int, color: tuple[int, int, int]) -> None:
    for i, digit in enumerate(str(int(number))):
        for row, bits in enumerate(_FONT[digit]):
            for col, bit in enumerate(bits):
                if bit == "1":
                    top, left = y + row * scale, x + (4 * i + col) * scale
                    canvas[top:top + scale, left:left + scale] = color


def answer_frame(image: np.ndarray, answer: int, label: int) -> np.ndarray:
    """An image-MDP observation [C, H, W] uint8, enlarged to ~224 px wide, above its answer and label."""
    image = np.asarray(image, dtype=np.uint8)
    rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image[:3]
    scale = max(1, 224 // rgb.shape[2])
    picture = rgb.transpose(1, 2, 0).repeat(scale, axis=0).repeat(scale, axis=1)
    height, width = picture.shape[:2]
    frame = np.zeros((height + _BAND, width, 3), dtype=np.uint8)
    frame[:height] = picture
    digit = 6  # pixels per font dot: 18x30 digits
    top = height + (_BAND - 5 * digit) // 2
    _draw_number(frame, answer, digit * 2, top, digit, _GREEN if answer == label else _RED)
    label_width = (4 * len(str(int(label))) - 1) * digit
    _draw_number(frame, label, width - label_width - digit * 2, top, digit, _GREY)
    return frame
