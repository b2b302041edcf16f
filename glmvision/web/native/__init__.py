"""The native API: /v1/chat/vision, /v1/chat, health probes and the model list."""
