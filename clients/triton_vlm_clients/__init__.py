"""tritonclient clients for triton-vlm: streaming and unary calls, the demo, benchmarks."""
