"""HTTP server: rtp-llm's native API and an OpenAI-compatible API over the engine."""
