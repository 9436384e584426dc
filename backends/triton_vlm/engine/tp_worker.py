"""A tensor-parallel rank > 0 of the language model: `python -m triton_vlm.engine.tp_worker ...`, started by rank 0.

It loads its shard, joins the process group and runs what rank 0 broadcasts until told to stop. It
exits by itself when rank 0's process goes away (unload, server stop or crash): no orphans.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch


def exit_with_parent(parent: int) -> None:
    """Exit as soon as the process `parent` is no longer this one's parent (run on a daemon thread)."""
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(0.5)


def start_workers(size: int, model_path: Path, device: str, dtype: str, num_blocks: int, block_size: int,
                  threads: int) -> tuple[str, list[subprocess.Popen]]:
    """Ranks 1..size-1 as child processes of this one (rank 0) -> (the rendezvous for `tp.init`, them)."""
    if size == 1:
        return "", []
    # a file rendezvous: no port to race for (gloo's own connections bind ports the kernel picks)
    init_method = f"file://{tempfile.gettempdir()}/triton-vlm-tp-{os.getpid()}-{uuid.uuid4().hex}"
    python = Path(sys.prefix) / "bin" / "python3"  # the stub's sys.executable is not a Python
    workers = []
    for rank in range(1, size):
        rank_device = f"cuda:{int(device.split(':')[1]) + rank}" if device.startswith("cuda") else device
        workers.append(subprocess.Popen([
            str(python), "-m", "triton_vlm.engine.tp_worker", "--rank", str(rank), "--size", str(size),
            "--init", init_method, "--model", str(model_path), "--device", rank_device, "--dtype", dtype,
            "--num-blocks", str(num_blocks), "--block-size", str(block_size), "--threads", str(threads),
            "--parent", str(os.getpid()),
        ]))
    return init_method, workers


def stop_workers(workers: list[subprocess.Popen], timeout_s: float = 30) -> None:
    for w in workers:
        try:
            w.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    for name in ("--rank", "--size", "--num-blocks", "--block-size", "--threads", "--parent"):
        p.add_argument(name, type=int, required=True)
    for name in ("--init", "--model", "--device", "--dtype"):
        p.add_argument(name, required=True)
    args = p.parse_args(argv)
    threading.Thread(target=exit_with_parent, args=(args.parent,), daemon=True).start()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from ..config import torch_dtype
    from ..models import load_family
    from ..models.tp import init
    from .runner import ModelRunner

    tp = init(args.rank, args.size, args.init, args.device)
    runner = ModelRunner(load_family(args.model), args.device, torch_dtype(args.dtype, args.device), tp,
                         args.num_blocks, args.block_size)
    runner.serve_forever()
    tp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
