"""The HTTP side: the app factory, the native and OpenAI routes, the page, security middleware."""
