"""An OpenAI-compatible HTTP front end (`/v1/chat/completions`, `/v1/completions`, `/v1/models`) that
forwards each request to the `vlm` ensemble over one gRPC channel (`tritonclient.grpc.aio` streams)."""
