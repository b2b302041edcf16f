"""Guards: client address, allowlist, circuit breaker, watchdog, degradation and redaction."""
