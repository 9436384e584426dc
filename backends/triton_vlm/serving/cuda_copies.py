"""Evidence of where image embeddings travel: with TRITON_VLM_CUDA_COPY_TRACE=DIR set, a stub records every
CUDA memory copy made in its process (the torch profiler, CUDA activity only, from `initialize` to
`finalize`) and writes DIR/<stage>-<pid>.json: for each kind of copy (`Memcpy DtoH (Device -> Pageable)`,
`Memcpy HtoD ...`, `Memcpy DtoD ...`) how many there were and their largest and total bytes. The GPU check
(`triton_vlm_clients.gpu_check`) asserts that no device-to-host copy is as large as a request's embeddings.
Off (and free) unless the variable is set and the process has CUDA."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from .. import env


class CopyTrace:
    def __init__(self, stage: str) -> None:
        self.stage, self.profiler = stage, None
        self.folder = env.cuda_copy_trace()
        if not self.folder:
            return
        import torch

        if torch.cuda.is_available():
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CUDA])
            self.profiler.__enter__()

    def stop(self) -> None:
        if self.profiler is None:
            return
        self.profiler.__exit__(None, None, None)
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        trace = folder / f"{self.stage}-{os.getpid()}.trace.json"
        self.profiler.export_chrome_trace(str(trace))
        sizes: dict[str, list[int]] = defaultdict(list)
        for event in json.loads(trace.read_text()).get("traceEvents", []):
            if event.get("cat") == "gpu_memcpy":
                sizes[event.get("name", "?")].append(int(event.get("args", {}).get("bytes", 0)))
        trace.unlink()
        summary = {kind: {"count": len(b), "max_bytes": max(b), "total_bytes": sum(b)} for kind, b in sizes.items()}
        (folder / f"{self.stage}-{os.getpid()}.json").write_text(json.dumps(summary, indent=1) + "\n")
        self.profiler = None
