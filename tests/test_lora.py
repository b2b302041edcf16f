"""LoRA adapters on the demo model with real PEFT: fine-tuning, GLMVISION_LORA, mixed batches, the API.

Two adapters are trained once for the module (a few steps each, on CPU) on tiny synthetic gauge
photos: `gauges` learns "The gauge reads N bar.", `colours` learns a colour word. Every serving test
loads them through GLMVISION_LORA as the service does.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
import torch
from helpers import ROOT, doc_example, image_b64, live_server, server_env
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from glmvision.backends.local.continuous import ContinuousEngine
from glmvision.backends.local.loading import load_model
from glmvision.backends.local.runtime import LoadedModel
from glmvision.backends.local.static import StaticEngine
from glmvision.core.backend import Admission
from glmvision.core.config import ConfigError, load_settings
from glmvision.core.generation import GenerationParams
from glmvision.training.finetune import Options, finetune, latest_checkpoint, read_examples, split

MODEL_ID = "glm-4.6v-flash-demo"
PROMPT = "What does the gauge read?"
ADMISSION = Admission(10_000, 600, lambda: 0.0)


def gauge(reading: int) -> Image.Image:
    """A dial with its needle at `reading` (0..100)."""
    image = Image.new("RGB", (96, 96), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 8, 88, 88), outline=(20, 20, 20), width=3)
    angle = math.radians(225 - 2.7 * reading)
    draw.line((48, 48, 48 + 36 * math.cos(angle), 48 - 36 * math.sin(angle)), fill=(200, 0, 0), width=3)
    return image


def write_data(folder: Path, answer: str) -> Path:
    """Eight gauge photos and a data file whose answers follow `answer` (formatted with the reading)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for number in range(8):
        reading = number * 12
        gauge(reading).save(folder / f"gauge-{number}.png")
        record = {"image": f"gauge-{number}.png", "prompt": PROMPT, "answer": answer.format(reading)}
        lines.append(json.dumps(record))
    data = folder / "data.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data


def options(data: Path, out: Path, demo_model_dir: Path, **changes: Any) -> Options:
    base: dict[str, Any] = {
        "model": str(demo_model_dir),
        "device": "cpu",
        "epochs": 3,
        "lr": 5e-2,
        "rank": 8,
        "alpha": 16,
        "eval_fraction": 0.25,
        "checkpoint_every": 0,
        "gradient_checkpointing": True,
    }
    base.update(changes)
    return Options(data, out, **base)


@pytest.fixture(scope="module")
def trained(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both adapters, trained once; their run reports."""
    root = tmp_path_factory.mktemp("lora")
    made: dict[str, Any] = {"root": root}
    for name, answer in (("gauges", "The gauge reads {} bar."), ("colours", "red red red {}")):
        data = write_data(root / f"{name}-data", answer)
        report = finetune(options(data, root / name, demo_model_dir), progress=False, log=lambda _: None)
        made[name] = (root / name, report)
    return made


@pytest.fixture(scope="module")
def served(trained: dict[str, Any], demo_model_dir: Path) -> LoadedModel:
    """The demo model with both adapters, loaded as GLMVISION_LORA has the service load them."""
    lora = f"gauges={trained['gauges'][0]},colours={trained['colours'][0]}"
    return load_model(
        load_settings(
            {"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cpu", "GLMVISION_LORA": lora}
        )
    )


@pytest.fixture(scope="module")
def plain(demo_model_dir: Path) -> LoadedModel:
    return load_model(load_settings({"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cpu"}))


def request(
    model: LoadedModel, reading: int, adapter: str | None, tokens: int = 10
) -> tuple[Any, GenerationParams]:
    content = [{"type": "image", "image": gauge(reading)}, {"type": "text", "text": PROMPT}]
    inputs = model.prepare([{"role": "user", "content": content}], enable_thinking=False)
    return inputs, GenerationParams(tokens, temperature=0, min_new_tokens=tokens, adapter=adapter)


def run_alone(model: LoadedModel, one: tuple[Any, GenerationParams]) -> list[int]:
    """generate() for one request by itself."""
    engine = StaticEngine(model, load_settings({"GLMVISION_MAX_BATCH_SIZE": 1}))
    job = engine._job(one[0], one[1], ADMISSION.admit())
    engine._serve_alone(job)
    return tokens(job)


def tokens(job: Any) -> list[int]:
    job.stream.whole()
    return job.stream.token_ids


# Fine-tuning.


def test_a_few_steps_lower_the_training_loss_and_report_the_held_out_loss(trained: dict[str, Any]) -> None:
    for name in ("gauges", "colours"):
        out, report = trained[name]
        assert report.steps == 18 and report.train_examples == 6 and report.held_out_examples == 2
        # The demo model's tiny random output layer keeps every loss near ln(512) = 6.24: a drop of
        # 0.1 is several times the step-to-step noise once training has begun.
        assert report.last_train_loss < report.first_train_loss - 0.1, report.train_losses
        assert report.held_out_loss_after < report.held_out_loss_before
        written = json.loads((out / "finetune.json").read_text(encoding="utf-8"))
        assert written["held_out_loss_after"] == report.held_out_loss_after
        config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
        assert config["peft_type"] == "LORA" and config["r"] == 8
        # The vision tower stays as it was: only language-model layers carry LoRA weights.
        weights = load_file(str(out / "adapter_model.safetensors"))
        assert weights and all(".language_model.layers." in key for key in weights)


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_run(
    trained: dict[str, Any], demo_model_dir: Path
) -> None:
    root: Path = trained["root"]
    data = root / "gauges-data" / "data.jsonl"
    whole = options(data, root / "whole", demo_model_dir, max_steps=6, checkpoint_every=3, dropout=0.1)
    finetune(whole, progress=False, log=lambda _: None)
    checkpoint = latest_checkpoint(root / "whole")
    assert checkpoint is not None and checkpoint.name == "step-000003"
    # A run stopped after its checkpoint at step 3, resumed: it redoes steps 3 to 5 only.
    resumed_dir = root / "resumed"
    resumed_dir.mkdir()
    (resumed_dir / "checkpoints").mkdir()
    checkpoint.rename(resumed_dir / "checkpoints" / checkpoint.name)
    resumed = options(
        data, resumed_dir, demo_model_dir, max_steps=6, checkpoint_every=3, dropout=0.1, resume=True
    )
    said: list[str] = []
    report = finetune(resumed, progress=False, log=said.append)
    assert report.resumed_from == 3 and len(report.train_losses) == 6 and "resuming from" in said[0]
    first = load_file(str(root / "whole" / "adapter_model.safetensors"))
    again = load_file(str(resumed_dir / "adapter_model.safetensors"))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)


def test_bad_data_lines_are_named(tmp_path: Path) -> None:
    from glmvision.training.finetune import FinetuneError

    gauge(10).save(tmp_path / "a.png")
    good = {"image": "a.png", "prompt": "p", "answer": "a"}
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "image": "missing.png"}) + "\n")
    with pytest.raises(FinetuneError, match=r"line 3: image 'missing.png' not found"):
        read_examples(data)
    data.write_text(json.dumps({**good, "answer": 3}) + "\n")
    with pytest.raises(FinetuneError, match=r"line 1: 'answer' must be a non-empty string"):
        read_examples(data)
    data.write_text(json.dumps(good) + "\n")
    train, held = split(read_examples(data), 0.5, 0)
    assert len(train) == 1 and held == []  # one example is never held out from itself
    from glmvision.cli.main import main

    assert main(["finetune", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "out")]) == 2
    assert main(["finetune", str(data), "--out", str(tmp_path / "out"), "--device", "gpu"]) == 2
    assert not (tmp_path / "out").exists()


# Serving: GLMVISION_LORA, per-row adapters.


def test_an_adapter_changes_greedy_output_and_the_base_rows_stay_the_base_model(
    served: LoadedModel, plain: LoadedModel
) -> None:
    base = run_alone(plain, request(plain, 30, None))
    assert run_alone(served, request(served, 30, None)) == base
    assert run_alone(served, request(served, 30, "gauges")) != base
    assert run_alone(served, request(served, 30, "colours")) != base


def test_two_adapters_in_one_continuous_batch_give_each_row_its_tokens_alone(served: LoadedModel) -> None:
    requests_ = [
        request(served, 30, "gauges", 12),
        request(served, 60, "colours", 8),
        request(served, 90, None, 10),
        request(served, 45, "gauges", 6),
    ]
    expected = [run_alone(served, one) for one in requests_]
    engine = ContinuousEngine(served, load_settings({"GLMVISION_MAX_BATCH_SIZE": 8}))
    jobs = [engine._job(one[0], one[1], ADMISSION.admit()) for one in requests_]
    engine._join(jobs[:3])  # three rows, two adapters and the base model, prefilled together
    engine._step()
    engine._step()
    engine._join(jobs[3:])  # a row joins the running mixed batch
    while engine._rows:
        engine._step()
    assert [tokens(job) for job in jobs] == expected


def test_two_adapters_in_one_static_batch_give_each_row_its_tokens_alone(served: LoadedModel) -> None:
    requests_ = [request(served, 20, "colours"), request(served, 70, "gauges"), request(served, 50, None)]
    expected = [run_alone(served, one) for one in requests_]
    engine = StaticEngine(served, load_settings({"GLMVISION_MAX_BATCH_SIZE": 8}))
    jobs = [engine._job(one[0], one[1], ADMISSION.admit()) for one in requests_]
    with engine._cond:
        engine._queue.extend(jobs)
        batch = engine._take()
    assert batch == jobs  # one generate() for all three
    engine._run(batch)
    assert [tokens(job) for job in jobs] == expected


# Configuration.


def test_bad_lora_values_fail_at_start(tmp_path: Path, trained: dict[str, Any], make_app: Any) -> None:
    for value, said in (
        ("gauges", "is not name=directory"),
        ("a:b=/x", "adapter name 'a:b'"),
        ("__base__=/x", "adapter name '__base__'"),
        (f"g={tmp_path},g={tmp_path}", "given twice"),
    ):
        with pytest.raises(ConfigError, match=r"GLMVISION_LORA .*" + said):
            load_settings({"GLMVISION_LORA": value})
    with pytest.raises(ConfigError, match=r"adapter 'nope' at .*missing: directory not found"):
        make_app(lora=f"nope={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match=r"adapter 'empty' at .*: no adapter_config.json"):
        make_app(lora=f"empty={tmp_path}")
    with pytest.raises(ConfigError, match=r"GLMVISION_LORA loads adapters into the local model"):
        load_settings(
            {"GLMVISION_BACKEND": "openai", "GLMVISION_UPSTREAM_URL": "http://x/v1", "GLMVISION_LORA": "a=/x"}
        )


# The API, in process: names, errors and the response cache.


@pytest.fixture(scope="module")
def lora_app(trained: dict[str, Any], demo_model_dir: Path) -> Any:
    from glmvision import create_app

    lora = f"gauges={trained['gauges'][0]},colours={trained['colours'][0]}"
    app = create_app(
        {"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cpu", "GLMVISION_LORA": lora}
    )
    app.config["TESTING"] = True
    return app


def vision(client: Any, **fields: Any) -> Any:
    body = {"image": image_b64(), "prompt": PROMPT, "max_new_tokens": 8, "temperature": 0, **fields}
    return client.post("/v1/chat/vision", json=body)


def test_unknown_adapters_are_404s_naming_the_field(lora_app: Any) -> None:
    with lora_app.test_client() as client:
        answer = vision(client, adapter="nope")
        assert answer.status_code == 404
        error = answer.get_json()["error"]
        assert (error["code"], error["param"]) == ("adapter_not_found", "adapter")
        assert "gauges, colours" in error["message"]
        chat = {"model": f"{MODEL_ID}:nope", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        answer = client.post("/v1/chat/completions", json=chat)
        assert answer.status_code == 404
        assert (answer.get_json()["error"]["code"], answer.get_json()["error"]["param"]) == (
            "model_not_found",
            "model",
        )


def test_the_cache_keeps_each_adapters_answer_apart(lora_app: Any, make_app: Any) -> None:
    with lora_app.test_client() as client:
        first = {name: vision(client, adapter=name).get_json() for name in ("gauges", "colours")}
        base = vision(client).get_json()
        # Asked again, each is a cache hit of its own adapter's answer.
        again = {name: vision(client, adapter=name).get_json() for name in ("gauges", "colours")}
        base_again = vision(client).get_json()
    texts = {name: answer["result"] for name, answer in first.items()}
    assert len({texts["gauges"], texts["colours"], base["result"]}) == 3
    assert {name: answer["result"] for name, answer in again.items()} == texts
    assert base_again["result"] == base["result"]
    assert [first["gauges"]["model"], again["colours"]["model"]] == [
        f"{MODEL_ID}:gauges",
        f"{MODEL_ID}:colours",
    ]


# End to end: real gunicorn, the official openai client, the native endpoint and /v1/models.


@pytest.fixture(scope="module")
def lora_server(
    trained: dict[str, Any], demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, runtime_dir: Path
) -> Iterator[Any]:
    lora = f"gauges={trained['gauges'][0]},colours={trained['colours'][0]}"
    env = server_env(demo_model_dir, runtime_dir, LORA=lora, CACHE="0")
    with live_server(tmp_path_factory.mktemp("lora-gunicorn"), env, ready_path="/readyz") as server:
        yield server


def test_adapters_end_to_end_on_gunicorn(lora_server: Any) -> None:
    listed = requests.get(lora_server.url + "/v1/models", timeout=10).json()["data"]
    assert [card["id"] for card in listed] == [MODEL_ID, f"{MODEL_ID}:gauges", f"{MODEL_ID}:colours"]
    assert "parent" not in listed[0] and {card.get("parent") for card in listed[1:]} == {MODEL_ID}
    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [model.id for model in client.models.list()] == [card["id"] for card in listed]
    # Image first, then the question: the conversation /v1/chat/vision makes of its body.
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64()}},
        {"type": "text", "text": PROMPT},
    ]
    answers = {}
    for model in (MODEL_ID, f"{MODEL_ID}:gauges", f"{MODEL_ID}:colours"):
        completion = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            max_tokens=8,
            temperature=0,
            extra_body={"min_tokens": 8},
        )
        assert completion.model == model and completion.usage.completion_tokens == 8
        answers[model] = completion.choices[0].message.content
    assert len(set(answers.values())) == 3  # each adapter answers in its own way
    same = client.chat.completions.create(
        model=f"{MODEL_ID}:gauges",
        messages=[{"role": "user", "content": content}],
        max_tokens=8,
        temperature=0,
    )
    native = requests.post(
        lora_server.url + "/v1/chat/vision",
        json={
            "image": image_b64(),
            "prompt": PROMPT,
            "max_new_tokens": 8,
            "temperature": 0,
            "adapter": "gauges",
        },
        timeout=60,
    ).json()
    assert native["model"] == f"{MODEL_ID}:gauges"
    assert native["result"] == same.choices[0].message.content  # the same adapter, by either name
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model=f"{MODEL_ID}:nope", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    assert "LoRA adapters loaded: gauges=" in lora_server.log()


def test_the_documented_openai_example_asks_the_adapter(lora_server: Any, tmp_path: Path) -> None:
    photos = tmp_path / "gauges" / "photos"  # as the walk-through's first step leaves them
    photos.mkdir(parents=True)
    gauge(40).save(photos / "0000.png")
    code = doc_example("lora-openai").replace("http://127.0.0.1:8080", lora_server.url)
    assert "/tmp/gauges/photos/0000.png" in code
    example = tmp_path / "example.py"
    example.write_text(code.replace("/tmp/gauges", str(tmp_path / "gauges")))
    result = subprocess.run(
        [sys.executable, str(example)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    listed, answered = result.stdout.splitlines()
    assert f"'{MODEL_ID}:gauges'" in listed and answered.startswith(f"{MODEL_ID}:gauges ")


# The docs' walk-through and example (docs/lora.md).


def test_the_documented_walk_through_trains_an_adapter_that_serves(
    tmp_path: Path, demo_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import runpy
    import shlex

    from glmvision.cli.main import main

    commands = [shlex.split(line) for line in doc_example("finetune").strip().splitlines()]
    assert [command[:2] for command in commands] == [
        [".venv/bin/python", "scripts/gauge_photos.py"],
        [".venv/bin/glmvision", "finetune"],
        ["GLMVISION_LORA=gauges=/tmp/adapters/gauges", "./scripts/serve.sh"],
    ]
    photos = [arg.replace("/tmp/gauges", str(tmp_path / "gauges")) for arg in commands[0][2:]]
    script = runpy.run_path(str(ROOT / commands[0][1]))
    assert script["main"](photos) == 0
    out = tmp_path / "adapters" / "gauges"
    finetune_args = [
        arg.replace("/tmp/adapters/gauges", str(out)).replace("/tmp/gauges", str(tmp_path / "gauges"))
        for arg in commands[1][1:]
    ]
    # Two steps rather than 270: what is checked is that the commands work and fit together.
    assert main([*finetune_args, "--max-steps", "2", "--model", str(demo_model_dir), "--device", "cpu"]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[0] == f"100 photos and {tmp_path / 'gauges' / 'train.jsonl'}"
    assert said[1].startswith(f"adapter written to {out}: 2 steps on 90 examples (cpu, float32)")
    settings = load_settings(
        {"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cpu", "GLMVISION_LORA": f"gauges={out}"}
    )
    assert load_model(settings).adapters.names == ("gauges",)  # type: ignore[union-attr]
