"""LoRA adapters (GLMVISION_LORA) on the one base model, through PEFT: checked at start, loaded with the
model, and applied per row, so requests for different adapters (or none) share a batch.

PEFT injects every adapter's LoRA layers into the base model's own modules, so the schedulers keep
calling the same model; a call through the PeftModel with `adapter_names` (one per row, `__base__`
for none) makes each LoRA layer add only that row's adapter (PEFT's mixed-adapter batch inference).
Only the language model may be adapted: in the vision tower the rows' images are one flat sequence of
patches, which PEFT cannot split by row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from glmvision.core.config import BASE_ADAPTER, ConfigError

log = logging.getLogger("glmvision")

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# The language model's linear layers in GLM-4.6V-Flash (and the demo model): attention and MLP.
LANGUAGE_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate_up_proj|down_proj))"
VISION_PART = ".visual."


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT (0.21) still asks transformers for `is_gradient_checkpointing`, which warns on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def check_adapters(adapters: Mapping[str, str]) -> None:
    """Refuse at start-up an adapter directory that is missing or holds no PEFT LoRA adapter."""
    for name, path in adapters.items():
        where = f"GLMVISION_LORA: adapter {name!r} at {path}"
        directory = Path(path)
        if not directory.is_dir():
            raise ConfigError(f"{where}: directory not found")
        try:
            config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        except OSError:
            raise ConfigError(f"{where}: no {CONFIG_FILE} (not a PEFT adapter directory)") from None
        except ValueError:
            raise ConfigError(f"{where}: {CONFIG_FILE} is not JSON") from None
        kind = config.get("peft_type") if isinstance(config, dict) else None
        if kind != "LORA":
            raise ConfigError(f"{where}: a {kind or 'unknown'} adapter; only LoRA is served")
        if not any((directory / weights).is_file() for weights in WEIGHT_FILES):
            raise ConfigError(f"{where}: no {' or '.join(WEIGHT_FILES)}")


def adapters_revision(adapters: Mapping[str, str]) -> str:
    """What identifies the adapters' weights (for the response cache): names, files' sizes and times."""
    digest = hashlib.sha256()
    for name, path in adapters.items():
        digest.update(f"{name}\0".encode())
        for file in sorted(Path(path).iterdir()):
            if file.is_file():
                stat = file.stat()
                digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


class Adapters:
    """The base model under PEFT with every configured adapter loaded; calls pick one per row."""

    def __init__(self, peft_model: Any, names: Sequence[str]) -> None:
        self.peft = peft_model
        self.names = tuple(names)
        self._active: str = names[0]  # PeftModel.from_pretrained makes the first one active

    def _choose(self, adapters: Sequence[str | None]) -> dict[str, Any]:
        """The call's PEFT arguments: per-row names, or none when every row uses one adapter."""
        first = adapters[0]
        if first is not None and all(adapter == first for adapter in adapters):
            # One adapter for the whole batch: PEFT's plain path through the active adapter is the
            # same arithmetic without per-call hooks on every LoRA layer and a gather per adapter.
            if first != self._active:
                self.peft.set_adapter(first, inference_mode=True)
                self._active = first
            return {}
        return {"adapter_names": [adapter or BASE_ADAPTER for adapter in adapters]}

    def forward(self, adapters: Sequence[str | None], **kwargs: Any) -> Any:
        """The base model's forward, each row through its own adapter (None: the base model)."""
        return self.peft(**kwargs, **self._choose(adapters))

    def generate(self, adapters: Sequence[str | None], **kwargs: Any) -> Any:
        """The base model's generate(), each row through its own adapter (None: the base model)."""
        return self.peft.generate(**kwargs, **self._choose(adapters))


def load_adapters(model: Any, adapters: Mapping[str, str]) -> Adapters:
    """Load every adapter onto `model` (in place) for inference; RuntimeError if one adapts vision."""
    from peft import PeftModel

    names = list(adapters)
    first, *rest = names
    with quiet_peft():
        peft_model = PeftModel.from_pretrained(model, adapters[first], adapter_name=first)
        for name in rest:
            peft_model.load_adapter(adapters[name], adapter_name=name)
    peft_model.eval()
    visual = sorted(
        {
            name
            for module_name, module in model.named_modules()
            if VISION_PART in f".{module_name}." and hasattr(module, "lora_A")
            for name in module.lora_A
        }
    )
    if visual:
        raise RuntimeError(
            f"GLMVISION_LORA: adapter(s) {', '.join(visual)} adapt the vision tower; only language-model "
            "adapters can share a batch (train with glmvision finetune's default target modules)"
        )
    log.info("LoRA adapters loaded: %s", ", ".join(f"{name}={adapters[name]}" for name in names))
    return Adapters(peft_model, names)
