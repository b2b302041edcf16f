"""The browser page at /."""
