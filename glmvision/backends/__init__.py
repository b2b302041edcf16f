"""Backends: what generates answers, behind the Backend protocol (glmvision.core.backend).

The app asks this module for one and never reaches inside: `local` is the model in this process,
`openai` an OpenAI-compatible engine (vLLM, SGLang) it forwards to.
"""

from __future__ import annotations

from glmvision.core.backend import Backend
from glmvision.core.config import Settings


def check_backend(settings: Settings) -> None:
    """Refuse, with a ConfigError, a configuration the chosen backend cannot serve (before any load)."""
    if settings.backend == "local":
        from glmvision.backends.local.adapters import check_adapters
        from glmvision.backends.local.loading import check_source

        check_source(settings.model)
        check_adapters(settings.lora_adapters)


def make_backend(settings: Settings) -> Backend:
    """The backend GLMVISION_BACKEND names: the model in this process, or an upstream engine."""
    if settings.backend == "openai":
        from glmvision.backends.upstream.backend import UpstreamBackend

        return UpstreamBackend(settings)
    from glmvision.backends.local.backend import LocalBackend

    return LocalBackend(settings)
