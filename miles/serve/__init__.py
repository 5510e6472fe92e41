"""HTTP serving for the native engine.

- `miles serve --model DIR` (`cli.py`): SGLang's native API (`/generate`, `/abort_request`, weight updates, ...;
  `server.py`) and the OpenAI API (`/v1/completions`, `/v1/chat/completions`, `/v1/models`; `openai_api.py`)
  over an `AsyncEngine` (`async_engine.py`), which drives the single-threaded `LLMEngine` from one thread.
- `miles router --worker-urls ...` (`router.py`): least-outstanding load balancing, session affinity,
  health checks with re-admission, retries on another worker.
- `launch.py`: start either as a subprocess (or an in-process engine in a thread) and wait for /health.
"""
