"""Core: Flask-free and torch-free request and response types, errors, images, URL fetching, settings."""
