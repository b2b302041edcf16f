"""Who may call: client address behind proxies, the IP allowlist, API keys, rate limits."""
