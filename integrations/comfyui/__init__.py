"""glmvision for ComfyUI: ask a running glmvision server about the images in a workflow.

ComfyUI imports this package from `custom_nodes/` and reads the two mappings below.
"""

from __future__ import annotations

from .node import GLMVisionAsk

NODE_CLASS_MAPPINGS = {"GLMVisionAsk": GLMVisionAsk}
NODE_DISPLAY_NAME_MAPPINGS = {"GLMVisionAsk": "GLM-4.6V: ask about image (glmvision)"}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
