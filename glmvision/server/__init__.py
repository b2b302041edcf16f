"""Serving under gunicorn: its worker class, access log, config and the WSGI app, inside the package."""
