"""transformers' own answer, computed without any of triton-vlm's serving code: the yardstick for parity
tests (`triton_vlm_clients.hf_baseline` uses only transformers)."""

from __future__ import annotations

import numpy as np

from triton_vlm_clients.hf_baseline import HFModel

_MODELS: dict[tuple[str, str], HFModel] = {}


def _load(path, device: str = "cpu") -> HFModel:
    if (str(path), device) not in _MODELS:
        _MODELS[str(path), device] = HFModel(path, device=device)
    return _MODELS[str(path), device]


def reference_inputs(path, prompt: str, images: list[bytes]) -> dict:
    return _load(path).inputs(prompt, images)


def reference_generate(path, prompt: str, images: list[bytes], max_new_tokens: int,
                       messages: list[dict] | None = None, device: str = "cpu") -> list[int]:
    """Greedy ids (fp32, on `device`) for `prompt` after the images, or for a whole conversation (`messages`
    with {"type": "image"} parts, which take `images` in order)."""
    return _load(path, device).generate(prompt, images, max_new_tokens, messages).output_ids


def reference_prefill_logits(path, prompt: str, images: list[bytes]) -> np.ndarray:
    return _load(path).prefill_logits(prompt, images)


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
VIDEO_REF_PYTHON = REPO / ".tools" / "video-ref" / "bin" / "python"


def reference_video_generate(path, messages: list[dict], files: dict[str, bytes], max_new_tokens: int,
                             fps: float | None = None, max_frames: int | None = None) -> tuple[list[int], list[int]]:
    """transformers' own processor (its torchvision video processor) and generate, greedy, in the video
    reference environment (`scripts/setup-video-ref.sh`, made here if missing). `messages`: chat messages
    whose {"type": "image"} / {"type": "video"} parts name a file of `files` as "file". -> (prompt ids, new ids)."""
    out = _video_reference(path, messages, files, max_new_tokens, fps, max_frames)
    return out["input_ids"].tolist(), out["output_ids"].tolist()


def reference_video_inputs(path, messages: list[dict], files: dict[str, bytes], fps: float | None = None,
                           max_frames: int | None = None) -> dict[str, np.ndarray]:
    """The processor's output alone: input_ids, pixel_values_videos, video_grid_thw."""
    return _video_reference(path, messages, files, 0, fps, max_frames)


def _video_reference(path, messages, files, max_new_tokens, fps, max_frames) -> dict[str, np.ndarray]:
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        request = {"model": str(path), "fps": fps, "max_frames": max_frames, "max_tokens": max_new_tokens,
                   "messages": [{**m, "content": [{**{k: v for k, v in part.items() if k != "file"},
                                                   **({"path": str(Path(tmp) / part["file"])} if "file" in part
                                                      else {})} for part in m["content"]]}
                                if isinstance(m["content"], list) else m for m in messages]}
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        out = Path(tmp) / "out.npz"
        _VIDEO_REFERENCE.ask(Path(tmp) / "request.json", out)
        return dict(np.load(out))


class _VideoReferenceProcess:
    """One `hf_video_reference.py --serve` for the test session, started at its first request (after
    `scripts/setup-video-ref.sh`): its imports take seconds, which each request paid before. It ends when
    the session does (its stdin closes)."""

    def __init__(self) -> None:
        import threading

        self.process, self.lock = None, threading.Lock()

    def ask(self, request, out) -> None:
        import atexit
        import json
        import subprocess

        with self.lock:
            if self.process is None or self.process.poll() is not None:
                subprocess.run(["bash", str(REPO / "scripts" / "setup-video-ref.sh")], check=True, capture_output=True)
                self.log = REPO / ".tools" / "video-ref.log"  # its stderr
                with open(self.log, "wb") as log:
                    self.process = subprocess.Popen(
                        [str(VIDEO_REF_PYTHON), str(REPO / "clients" / "triton_vlm_clients" / "hf_video_reference.py"),
                         "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
                atexit.register(self.close)
            self.process.stdin.write(f"{request}\t{out}\n")
            self.process.stdin.flush()
            reply = self.process.stdout.readline()
        if reply.startswith("error: "):
            raise RuntimeError(f"the video reference failed:\n{json.loads(reply[7:])[-3000:]}")
        if reply != "ok\n":
            raise RuntimeError(f"the video reference process ended (exit code {self.process.poll()}); see {self.log}")


    def close(self) -> None:
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait(timeout=30)
            self.process.stdout.close()


_VIDEO_REFERENCE = _VideoReferenceProcess()
