"""The ComfyUI node, loaded as ComfyUI loads a custom node, run against real gunicorn on the demo model."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import requests
import torch
from helpers import ROOT, LiveServer, free_port, live_server, server_env
from PIL import Image

KEY = "comfy-key"


def load_like_comfyui(path: Path, name: str = "glmvision_comfyui") -> ModuleType:
    """What ComfyUI's load_custom_node does with a folder in custom_nodes/."""
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def package() -> ModuleType:
    return load_like_comfyui(ROOT / "integrations" / "comfyui")


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, runtime_dir: Path
) -> Iterator[LiveServer]:
    env = server_env(demo_model_dir, runtime_dir, API_KEYS=KEY)
    with live_server(tmp_path_factory.mktemp("comfyui"), env, ready_path="/readyz") as live:
        yield live


def decoded(png: bytes) -> tuple[str, np.ndarray]:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image.mode, np.asarray(image)


def test_the_package_exports_what_comfyui_reads(package: ModuleType) -> None:
    node = package.NODE_CLASS_MAPPINGS["GLMVisionAsk"]
    assert set(package.NODE_DISPLAY_NAME_MAPPINGS) == set(package.NODE_CLASS_MAPPINGS)
    assert node.RETURN_TYPES == ("STRING",) and callable(getattr(node(), node.FUNCTION))
    inputs = node.INPUT_TYPES()
    required = inputs["required"]
    assert required["image"] == ("IMAGE",)
    assert required["prompt"][0] == "STRING" and required["prompt"][1]["multiline"] is True
    assert [required[name][0] for name in ("server", "api_key", "max_tokens", "temperature", "thinking")] == [
        "STRING", "STRING", "INT", "FLOAT", "BOOLEAN",
    ]  # fmt: skip
    assert set(inputs["optional"]) == {"timeout"}


def test_a_batch_of_two_becomes_two_exact_pngs(package: ModuleType) -> None:
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(2, 5, 7, 3, generator=generator) * 1.4 - 0.2  # some values outside 0..1
    batch[0, 0, 0] = torch.tensor([0.0, 1.0, 0.5])
    pngs = package.node.tensor_to_pngs(batch)
    assert len(pngs) == 2
    expected = np.rint(np.clip(batch.numpy(), 0, 1) * 255).astype(np.uint8)
    for png, want in zip(pngs, expected, strict=True):
        mode, pixels = decoded(png)
        assert mode == "RGB" and pixels.shape == (5, 7, 3)
        assert np.array_equal(pixels, want)
    assert decoded(pngs[0])[1][0, 0].tolist() == [0, 255, 128]  # 0.5 rounds to 128, not 127


def test_rgba_and_greyscale_keep_their_channels(package: ModuleType) -> None:
    rgba = torch.zeros(1, 2, 3, 4)
    rgba[..., 3] = 0.25
    rgba[0, 1, 2] = torch.tensor([1.0, 0.0, 0.0, 1.0])
    mode, pixels = decoded(package.node.tensor_to_pngs(rgba)[0])
    assert (
        mode == "RGBA"
        and pixels[0, 0].tolist() == [0, 0, 0, 64]
        and pixels[1, 2].tolist() == [255, 0, 0, 255]
    )
    grey = torch.full((1, 2, 2, 1), 0.2)
    mode, pixels = decoded(package.node.tensor_to_pngs(grey)[0])
    assert mode == "L" and pixels.tolist() == [[51, 51], [51, 51]]
    one = package.node.tensor_to_pngs(torch.ones(4, 4, 3))  # no batch axis: one image
    assert len(one) == 1 and decoded(one[0])[1].min() == 255
    with pytest.raises(ValueError, match="batch x height x width"):
        package.node.tensor_to_pngs(torch.ones(1, 4, 4, 2))


def test_the_node_answers_from_the_server(package: ModuleType, server: LiveServer) -> None:
    node = package.NODE_CLASS_MAPPINGS["GLMVisionAsk"]()
    images = torch.rand(2, 48, 64, 3, generator=torch.Generator().manual_seed(1))
    (answer,) = getattr(node, node.FUNCTION)(
        image=images, prompt="Compare them.", server=server.url, api_key=KEY,
        max_tokens=6, temperature=0.0, thinking=False,
    )  # fmt: skip
    assert isinstance(answer, str)
    body = package.node.request_body(package.node.tensor_to_pngs(images), "Compare them.", 6, 0.0, False)
    direct = requests.post(
        server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ).json()
    assert direct["choices"][0]["message"]["content"] == answer
    assert direct["usage"]["completion_tokens"] == 6
    logged = [json.loads(line) for line in server.log().splitlines() if line.startswith('{"time"')]
    sizes = [[(i["width"], i["height"]) for i in line.get("images", [])] for line in logged]
    assert [(64, 48), (64, 48)] in sizes  # both images of the batch went in the one question


def test_failures_raise_readable_errors(package: ModuleType, server: LiveServer) -> None:
    node = package.NODE_CLASS_MAPPINGS["GLMVisionAsk"]()
    run = getattr(node, node.FUNCTION)
    common: dict[str, Any] = {"prompt": "Hi?", "max_tokens": 2, "temperature": 0.0, "thinking": False}
    image = torch.rand(1, 16, 16, 3)
    with pytest.raises(package.node.GLMVisionError, match=r"HTTP 401: .*\(missing_api_key\)"):
        run(image=image, server=server.url, api_key="", **common)
    with pytest.raises(package.node.GLMVisionError, match="cannot reach"):
        run(image=image, server=f"http://127.0.0.1:{free_port()}", api_key=KEY, **common)
    with pytest.raises(package.node.GLMVisionError, match="must start with http"):
        run(image=image, server="127.0.0.1:8080", api_key=KEY, **common)
    with pytest.raises(package.node.GLMVisionError, match="expected IMAGE as batch x height x width"):
        run(image=torch.rand(1, 16, 16, 2), server=server.url, api_key=KEY, **common)
