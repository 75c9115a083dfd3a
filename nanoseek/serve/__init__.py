"""`nanoseek serve`: an OpenAI-compatible HTTP server with continuous batching (docs/serving.md).

- `protocol`     request bodies (pydantic) and OpenAI's error JSON
- `app`          the FastAPI app: routes, the engine's lifetime, every error as OpenAI's error JSON
- `handlers`     request body -> token ids + sampling parameters -> engine job -> JSON or server-sent events
- `bridge`       engine thread <-> event loop: token hand-over, a request's queue, client disconnects
- `engine_loop`  the one thread that owns the model: admission, batched prefill, decode steps, rows
                 joining and leaving between steps, cancellation, per-request fault isolation
- `paged_cache`  the latent KV cache in fixed-size blocks that follow live tokens, seen by the model
                 through a per-step view in the `LatentKVCache` interface
- `detokenize`   token ids -> text deltas: stop strings, the reasoning split, token bytes
- `cli`          the command: load, bind, run uvicorn, shut down cleanly on Ctrl-C / SIGTERM
"""
