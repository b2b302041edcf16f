"""LoRA adapters as clients name them: `model: "<id>:<name>"` (as vLLM's --lora-modules) or `adapter`."""

from __future__ import annotations

from glmvision.core.errors import APIError

SEPARATOR = ":"


def model_name(served: str, adapter: str | None) -> str:
    """The model name of an answer: the served id, with `:<adapter>` when one answered."""
    return f"{served}{SEPARATOR}{adapter}" if adapter else served


def _unknown(adapter: str, served: tuple[str, ...] | None) -> str:
    known = ", ".join(served or ()) or "none"
    return f"No LoRA adapter {adapter!r} is loaded (GLMVISION_LORA: {known})."


def adapter_of_model(
    model: str | None, model_names: tuple[str, ...], adapters: tuple[str, ...] | None
) -> str | None:
    """The adapter `model` asks for (None: the base model; `adapters` None: any); else 404 model_not_found."""
    if model is None or model in model_names:
        return None
    for name in model_names:
        prefix = name + SEPARATOR
        if model.startswith(prefix) and len(model) > len(prefix):
            adapter = model[len(prefix) :]
            if adapters is None or adapter in adapters:
                return adapter
            raise APIError(404, "model_not_found", _unknown(adapter, adapters), "model")
    served = ", ".join(model_names)
    raise APIError(
        404, "model_not_found", f"The model {model!r} does not exist; this server serves: {served}.", "model"
    )


def check_adapter(adapter: str | None, adapters: tuple[str, ...] | None) -> str | None:
    """A native request's `adapter`, if loaded (None: the base model); 404 adapter_not_found if not."""
    if adapter is None or adapters is None or adapter in adapters:
        return adapter
    raise APIError(404, "adapter_not_found", _unknown(adapter, adapters), "adapter")
