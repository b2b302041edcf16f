"""The browser page at `/`: plain HTML, CSS and JS shipped in the package (glmvision/web/static), no build."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, render_template, request

from glmvision.web.route_table import PAGE_ENDPOINTS, route
from glmvision.web.state import app_state

bp = Blueprint("page", __name__)

# No inline script or style anywhere: the page's own files only, images and videos from data:/blob:
# URLs it makes itself, requests to this origin only, and never inside another site's frame.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


@route(bp, "page.index")
def index() -> str:
    """The chat page, told the server's limits through data attributes (read by static/page.js)."""
    state = app_state()
    settings, auth = state.service.settings, state.auth
    return render_template(
        "index.html",
        max_image_side=settings.max_image_side,
        max_body_bytes=int(settings.max_body_mb * 1024 * 1024),
        max_video_bytes=int(settings.max_video_mb * 1024 * 1024),
        needs_key="true" if auth.enabled else "false",
    )


def _page_headers(response: Response) -> Response:
    if request.endpoint in PAGE_ENDPOINTS:
        response.headers.update(PAGE_HEADERS)
        if request.endpoint == "page.index":
            response.headers["Cache-Control"] = "no-store"
    return response


def init_app(app: Flask) -> None:
    """Serve the page at `/` (its files at /static/), with strict headers."""
    app.register_blueprint(bp)
    app.after_request(_page_headers)
