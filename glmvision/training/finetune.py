"""`glmvision finetune DATA.jsonl --out ADAPTER_DIR`: a LoRA adapter for GLMVISION_LORA, trained with PEFT.

Each data line is `{"image": path, "prompt": ..., "answer": ...}` (a relative path is relative to the
data file). Examples are encoded exactly as the service encodes a request (the same image decoding and
resizing, the same chat template), and only the answer's tokens, with the stop token after them, are
learnt. LoRA goes on the language model's linear layers; the vision tower and every base weight stay
frozen. A held-out share of the examples is never trained on: its loss is reported before, during and
after training. Checkpoints go to ADAPTER_DIR/checkpoints every --checkpoint-every steps; --resume
goes on from the latest. The adapter itself is written to ADAPTER_DIR, ready for GLMVISION_LORA.
Exit status: 0 trained; 2 bad usage or data; 130 interrupted (resume from the last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
REPORT_FILE = "finetune.json"
WARMUP_SHARE = 0.1
# Steps averaged for the first and last train loss reported (a quarter of the run when shorter).
LOSS_WINDOW = 10


class FinetuneError(ValueError):
    """Bad data or options: said in one line, no traceback."""


@dataclass(frozen=True)
class Example:
    """One data line: an image file, the question asked about it, and the answer to learn."""

    image: Path
    prompt: str
    answer: str
    line: int


@dataclass(frozen=True)
class Options:
    """What `glmvision finetune` was asked to do."""

    data: Path
    out: Path
    model: str = ""  # empty: GLMVISION_MODEL, else the demo model
    device: str = "auto"
    epochs: float = 3.0
    max_steps: int = 0  # 0: epochs decide
    batch_size: int = 1
    lr: float = 2e-4
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = ""  # empty: the language model's attention and MLP layers
    eval_fraction: float = 0.1
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    gradient_checkpointing: bool = True


@dataclass
class Report:
    """What a run did: losses (mean over answer tokens), steps and time."""

    out: str
    steps: int
    train_examples: int
    held_out_examples: int
    first_train_loss: float | None = None  # mean of the first steps' losses (see LOSS_WINDOW)
    last_train_loss: float | None = None  # mean of the last steps' losses
    held_out_loss_before: float | None = None
    held_out_loss_after: float | None = None
    seconds: float = 0.0
    device: str = ""
    dtype: str = ""
    resumed_from: int = 0
    train_losses: list[float] = field(default_factory=list)  # one per step
    history: list[dict[str, float]] = field(default_factory=list)  # at each checkpoint and the end

    def settle(self) -> None:
        """Fill first/last train loss from the steps' losses."""
        losses = self.train_losses
        if losses:
            window = max(1, min(LOSS_WINDOW, len(losses) // 4))
            self.first_train_loss = round(sum(losses[:window]) / window, 4)
            self.last_train_loss = round(sum(losses[-window:]) / window, 4)


def read_examples(path: Path) -> list[Example]:
    """The data file's examples; FinetuneError naming the line of the first bad one."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FinetuneError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    examples: list[Example] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(text)
        except ValueError:
            raise FinetuneError(f"{where}: not JSON") from None
        if not isinstance(record, dict):
            raise FinetuneError(f"{where}: not a JSON object")
        for key in ("image", "prompt", "answer"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise FinetuneError(f"{where}: {key!r} must be a non-empty string")
        image = Path(record["image"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise FinetuneError(f"{where}: image {record['image']!r} not found")
        examples.append(Example(image, record["prompt"], record["answer"], number))
    if not examples:
        raise FinetuneError(f"{path}: no examples")
    return examples


def split(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): a seeded shuffle, with at least one example trained on."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    held = min(len(order) - 1, max(1, round(len(order) * fraction))) if fraction > 0 else 0
    return order[held:], order[:held]


def learning_rate(step: int, total: int, peak: float) -> float:
    """Warm-up over the first tenth of the steps, then linear decay to 0: a function of the step alone."""
    warmup = max(1, int(total * WARMUP_SHARE))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def _settings(options: Options, device: str, dtype: str) -> Any:
    from glmvision.core.config import load_settings

    overrides = {"GLMVISION_DEVICE": device, "GLMVISION_DTYPE": dtype, "GLMVISION_LORA": ""}
    if options.model:
        overrides["GLMVISION_MODEL"] = options.model
    return load_settings(overrides)


def _device_and_dtype(requested: str) -> tuple[str, str]:
    """Where to train: the GPU in bf16 when there is one (fp16 where it lacks bf16), else the CPU in fp32."""
    import torch

    from glmvision.backends.local.hardware import resolve_device

    if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+", requested):
        raise FinetuneError(f"--device {requested}: auto, cpu, cuda or cuda:N")
    cuda = torch.cuda.is_available()
    device = resolve_device(requested, cuda, torch.cuda.device_count() if cuda else 0)
    if device == "cpu":
        return device, "float32"
    return device, "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


class Encoder:
    """Turns an example into training tensors the way the service turns a request into model inputs."""

    def __init__(self, loaded: Any, settings: Any) -> None:
        self.loaded = loaded
        self.settings = settings
        tokenizer = loaded.processor.tokenizer
        self._tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self._end = eos if eos is not None else loaded.stop_ids[0]

    def __call__(self, example: Example) -> dict[str, Any]:
        import torch

        from glmvision.core.errors import APIError
        from glmvision.core.images import open_image

        try:
            image = open_image(
                example.image.read_bytes(),
                max_side=self.settings.max_image_side,
                max_pixels=self.settings.max_image_pixels,
                fit=self.loaded.fit_image,
            )
            content = [{"type": "image", "image": image.image}, {"type": "text", "text": example.prompt}]
            inputs = self.loaded.prepare([{"role": "user", "content": content}], enable_thinking=False)
        except APIError as exc:
            raise FinetuneError(f"line {example.line}: {example.image}: {exc.description}") from None
        answer = self._tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [self._end]
        answer_ids = torch.tensor([answer], dtype=inputs["input_ids"].dtype)
        features = dict(inputs)
        features["input_ids"] = torch.cat([inputs["input_ids"], answer_ids], dim=1)
        features["attention_mask"] = torch.ones_like(features["input_ids"])
        if "mm_token_type_ids" in inputs:
            kinds = inputs["mm_token_type_ids"]
            features["mm_token_type_ids"] = torch.cat([kinds, kinds.new_zeros((1, len(answer)))], dim=1)
        ignored = torch.full_like(inputs["input_ids"], -100)
        features["labels"] = torch.cat([ignored, answer_ids], dim=1)
        return features


def collate_examples(features: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Left-pad encoded examples into one batch (as the service does), labels padded with -100."""
    import torch

    from glmvision.backends.local.engine import collate

    batch = collate([{k: v for k, v in f.items() if k != "labels"} for f in features], pad_id)
    length = batch["input_ids"].shape[1]
    batch["labels"] = torch.cat(
        [
            torch.cat([f["labels"].new_full((1, length - f["labels"].shape[1]), -100), f["labels"]], 1)
            for f in features
        ]
    )
    return batch


def _on_device(batch: dict[str, Any], model: Any) -> dict[str, Any]:
    moved = {key: value.to(model.device) for key, value in batch.items()}
    if "pixel_values" in moved:
        moved["pixel_values"] = moved["pixel_values"].to(model.dtype)
    return moved


def _token_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """The batch's mean loss over its answer tokens, and how many there are."""
    out = model(**_on_device(batch, model), use_cache=False)
    return out.loss, int((batch["labels"][:, 1:] != -100).sum())


def held_out_loss(model: Any, encoded: Sequence[dict[str, Any]], pad_id: int) -> float | None:
    """Mean loss per answer token over the held-out examples (None without any)."""
    import torch

    if not encoded:
        return None
    was_training = model.training
    model.eval()
    total = tokens = 0.0
    with torch.no_grad():
        for features in encoded:
            loss, count = _token_loss(model, collate_examples([features], pad_id))
            total += float(loss) * count
            tokens += count
    model.train(was_training)
    return round(total / max(tokens, 1), 4)


def _batches(count: int, size: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[start : start + size] for start in range(0, count, size)]


def _schedule(train: int, options: Options) -> Iterator[tuple[int, list[int]]]:
    """(step, example indices) for every step of the run, the same on every run with these options."""
    per_epoch = math.ceil(train / options.batch_size)
    total = options.max_steps or max(1, math.ceil(per_epoch * options.epochs))
    step = 0
    epoch = 0
    while step < total:
        for indices in _batches(train, options.batch_size, options.seed, epoch):
            if step >= total:
                return
            yield step, indices
            step += 1
        epoch += 1


def total_steps(train: int, options: Options) -> int:
    """Steps the run takes in all."""
    per_epoch = math.ceil(train / options.batch_size)
    return options.max_steps or max(1, math.ceil(per_epoch * options.epochs))


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under out/checkpoints."""
    folder = out / CHECKPOINTS
    done = (
        [path for path in folder.glob("step-*") if (path / STATE_FILE).is_file()] if folder.is_dir() else []
    )
    return max(done, key=lambda path: int(path.name.removeprefix("step-")), default=None)


def _save_checkpoint(
    peft_model: Any, optimizer: Any, out: Path, step: int, report: Report, keep: int
) -> None:
    import torch

    folder = out / CHECKPOINTS / f"step-{step:06d}"
    peft_model.save_pretrained(folder)
    # The RNG too: LoRA dropout draws from it, so a resumed run goes on exactly as this one would have.
    rng = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, folder / OPTIMIZER_FILE)
    # Written last: a checkpoint without it was cut short and is never resumed from.
    (folder / STATE_FILE).write_text(json.dumps({"step": step, "report": asdict(report)}), encoding="utf-8")
    older = sorted(
        (path for path in (out / CHECKPOINTS).glob("step-*") if path != folder),
        key=lambda path: int(path.name.removeprefix("step-")),
    )
    for path in older[: max(0, len(older) - (keep - 1))] if keep > 0 else older:
        shutil.rmtree(path, ignore_errors=True)


def _lora_config(options: Options) -> Any:
    from peft import LoraConfig

    from glmvision.backends.local.adapters import LANGUAGE_TARGETS

    return LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules or LANGUAGE_TARGETS,
        bias="none",
    )


def finetune(options: Options, progress: bool = True, log: Callable[[str], None] = print) -> Report:
    """Train a LoRA adapter as `options` say and write it to options.out; the run's figures."""
    import torch
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from tqdm import tqdm

    from glmvision.backends.local.adapters import quiet_peft
    from glmvision.backends.local.loading import load_model

    started = time.perf_counter()
    _check(options)
    examples = read_examples(options.data)
    train, held = split(examples, options.eval_fraction, options.seed)
    device, dtype = _device_and_dtype(options.device)
    settings = _settings(options, device, dtype)
    loaded = load_model(settings)
    model = loaded.model
    torch.manual_seed(options.seed)
    with quiet_peft():
        peft_model = get_peft_model(model, _lora_config(options))
    if options.gradient_checkpointing:
        # Non-reentrant: the frozen embeddings' output needs no grad for the recompute to be traced.
        model.activation_checkpointing_enable({"use_reentrant": False})
    encode = Encoder(loaded, settings)
    encoded_train = [encode(example) for example in train]
    encoded_held = [encode(example) for example in held]
    total = total_steps(len(train), options)
    report = Report(str(options.out), total, len(train), len(held), device=device, dtype=dtype)
    trainable = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=0.0)
    start = 0
    checkpoint = latest_checkpoint(options.out) if options.resume else None
    if checkpoint is not None:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        weights = load_file(str(checkpoint / "adapter_model.safetensors"), device=str(model.device))
        set_peft_model_state_dict(peft_model, weights)
        saved = torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"]["cpu"])
        if saved["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        start = int(state["step"])
        report = Report(**{**state["report"], "steps": total, "resumed_from": start})
        log(f"resuming from {checkpoint} (step {start} of {total})")
    elif options.resume:
        log(f"no checkpoint in {options.out / CHECKPOINTS}: starting afresh")
    if report.held_out_loss_before is None:
        report.held_out_loss_before = held_out_loss(peft_model, encoded_held, loaded.pad_id)
    spent = report.seconds  # by the runs before this one
    peft_model.train()
    bar = tqdm(
        total=total, initial=start, desc="finetune", unit="step", disable=not progress, dynamic_ncols=True
    )
    smoothed: float | None = None
    try:
        for step, indices in _schedule(len(train), options):
            if step < start:
                continue
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, options.lr)
            loss, _ = _token_loss(
                peft_model, collate_examples([encoded_train[i] for i in indices], loaded.pad_id)
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            report.train_losses.append(round(value, 4))
            smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
            done = step + 1
            postfix = {"loss": f"{smoothed:.4f}"}
            if options.checkpoint_every and done % options.checkpoint_every == 0 and done < total:
                held_loss = held_out_loss(peft_model, encoded_held, loaded.pad_id)
                report.history.append(_entry(done, smoothed, held_loss))
                report.seconds = round(spent + time.perf_counter() - started, 2)
                _save_checkpoint(peft_model, optimizer, options.out, done, report, options.keep_checkpoints)
                if held_loss is not None:
                    postfix["held_out"] = f"{held_loss:.4f}"
            bar.set_postfix(postfix)
            bar.update(1)
    finally:
        bar.close()
    report.held_out_loss_after = held_out_loss(peft_model, encoded_held, loaded.pad_id)
    report.history.append(_entry(total, smoothed, report.held_out_loss_after))
    report.seconds = round(spent + time.perf_counter() - started, 2)
    report.settle()
    peft_model.save_pretrained(options.out)
    (options.out / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
    return report


def _entry(step: int, train_loss: float | None, held_loss: float | None) -> dict[str, float]:
    entry: dict[str, float] = {"step": step}
    if train_loss is not None:
        entry["train_loss"] = round(train_loss, 4)
    if held_loss is not None:
        entry["held_out_loss"] = round(held_loss, 4)
    return entry


def _check(options: Options) -> None:
    if options.batch_size < 1 or options.rank < 1 or options.alpha < 1:
        raise FinetuneError("--batch-size, --rank and --alpha must be at least 1")
    if options.epochs <= 0 and not options.max_steps:
        raise FinetuneError("--epochs must be positive (or give --max-steps)")
    if options.max_steps < 0 or options.checkpoint_every < 0 or options.keep_checkpoints < 0:
        raise FinetuneError("--max-steps, --checkpoint-every and --keep-checkpoints cannot be negative")
    if not 0 <= options.eval_fraction < 1:
        raise FinetuneError("--eval-fraction must be in [0, 1)")
    if not 0 <= options.dropout < 1 or options.lr <= 0:
        raise FinetuneError("--dropout must be in [0, 1) and --lr positive")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`glmvision finetune`'s arguments."""
    parser.add_argument(
        "data", metavar="DATA.jsonl", help='lines of {"image": path, "prompt": ..., "answer": ...}'
    )
    parser.add_argument("--out", required=True, metavar="ADAPTER_DIR", help="where the adapter is written")
    parser.add_argument(
        "--model",
        default="",
        metavar="PATH_OR_ID",
        help="base model (default: GLMVISION_MODEL, else the demo)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument(
        "--epochs", type=float, default=3.0, help="passes over the training examples (default 3)"
    )
    parser.add_argument(
        "--max-steps", type=int, default=0, metavar="N", help="stop after N steps (default: --epochs)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=1, metavar="N", help="examples per step (default 1)"
    )
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--alpha", type=int, default=32, help="LoRA alpha (default 32)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    parser.add_argument(
        "--target-modules",
        default="",
        metavar="REGEX",
        help="modules to adapt, a regex over module names (default: the language model's attention and MLP)",
    )
    parser.add_argument(
        "--eval-fraction",
        type=float,
        default=0.1,
        help="share of examples held out for the loss report (default 0.1)",
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=50, metavar="N", help="steps between checkpoints (0: none)"
    )
    parser.add_argument(
        "--keep-checkpoints", type=int, default=2, metavar="N", help="newest checkpoints kept (default 2)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="go on from the newest checkpoint in ADAPTER_DIR"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="for the split, the order and LoRA's initial weights"
    )
    parser.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="keep activations instead of recomputing them (faster, more memory)",
    )


def run(args: argparse.Namespace, err: TextIO = sys.stderr) -> int:
    """Run `glmvision finetune`; print the figures. Exit 0 trained, 2 bad usage or data, 130 interrupted."""
    from glmvision.core.config import ConfigError

    names = {name for name in Options.__dataclass_fields__} - {"data", "out"}
    options = Options(Path(args.data), Path(args.out), **{name: getattr(args, name) for name in names})
    try:
        report = finetune(options, log=lambda line: print(line, file=err))
    except (FinetuneError, ConfigError) as exc:  # bad data or options, or a setting they lead to
        print(f"glmvision finetune: {exc}", file=err)
        return 2
    except KeyboardInterrupt:
        print("glmvision finetune: interrupted; --resume goes on from the last checkpoint", file=err)
        return 130
    print(summary(report))
    return 0


def summary(report: Report) -> str:
    """The run in one line."""
    held = (
        f", held-out loss {report.held_out_loss_before:.4f} -> {report.held_out_loss_after:.4f}"
        if report.held_out_loss_before is not None and report.held_out_loss_after is not None
        else ""
    )
    train = (
        f"train loss {report.first_train_loss:.4f} -> {report.last_train_loss:.4f}"
        if report.first_train_loss is not None and report.last_train_loss is not None
        else "no step run"
    )
    return (
        f"adapter written to {report.out}: {report.steps} steps on {report.train_examples} examples "
        f"({report.device}, {report.dtype}), {train}{held}, {report.seconds:.1f}s"
    )
