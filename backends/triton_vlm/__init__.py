"""triton-vlm: serve vision-language models on NVIDIA Triton Inference Server."""

from .stubs import dump_stacks_on_signal

__version__ = "0.1.0"

dump_stacks_on_signal()  # first thing in every stub (each model.py imports this package first) and engine process
