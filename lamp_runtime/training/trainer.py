"""The training loop: only the soft-prompt tensors learn; the backbone is frozen and gets no grads.

Loss is the mean cross-entropy over target tokens only (the completion and its EOS); the forward
passes for decoder-only and encoder-decoder backbones are in `forward.py`.
Optimizer: Adafactor (steps relative to each tensor's RMS; AdamW optional) with linear warmup then linear
decay to zero, and gradient-norm clipping.
The LAMP paper gives lr 0.3 but no warmup or clipping; without them the first steps at lr 0.3
overshoot (see prompts/README.md), so both are on by default.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters import AdapterLimits, AdapterMeta, PromptAdapter, adapter_from_safetensors, save_adapter, validate
from ..adapters.provenance import TRAINED_ON_KEY, numerics
from ..backbone.hf import Backbone
from ..errors import require_at_least
from ..tasks.format import INPUT_TEMPLATE
from .data import Example
from .forward import prompt_forward
from .methods import METHODS, EptShape, PromptMethod, build_method, text_init, vocab_init

OPTIMIZERS = ("adafactor", "adamw")


# Below this loss the targets are all but certain and a zero gradient can be genuine underflow.
SATURATED_LOSS = 1e-4


class TrainingError(ValueError):
    """Training cannot proceed with these settings (the message says why and what to change)."""


@dataclass(frozen=True)
class TrainConfig:
    method: str = "lamp"
    optimizer: str = "adafactor"
    prompt_length: int = 100
    rank: int = 8
    pool: int = 1
    learning_rate: float = 0.3
    batch_size: int = 8
    epochs: int = 1
    max_steps: int | None = None
    warmup_steps: int | None = None  # None: 10% of the steps
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    eval_every: int | None = None  # steps; None: once per epoch
    eval_batch_size: int = 16
    seed: int = 0
    init_text: str | None = None
    ept: EptShape = field(default_factory=EptShape)  # used by method "ept" only

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {self.method!r}")
        require_at_least(self, 1, "prompt_length", "rank", "pool", "batch_size", "epochs", "eval_batch_size",
                         "max_steps", "eval_every")
        require_at_least(self, 0, "warmup_steps")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.method == "ept" and self.pool != 1:
            raise ValueError(f"EPT prompts are not pooled; got pool={self.pool} (use 1)")
        require_at_least(self.ept, 1, "offset_tokens", "spaces", "projection_rank", prefix="ept ")

    def total_steps(self, num_examples: int) -> int:
        """`max_steps` when given (epochs repeat as needed, as in HF Trainer), else whole epochs."""
        if self.max_steps:
            return self.max_steps
        return math.ceil(num_examples / self.batch_size) * self.epochs


@dataclass(frozen=True)
class EvalPoint:
    step: int
    loss: float
    exact_match: float  # share of rows whose greedy completion is exactly target + EOS


@dataclass
class TrainResult:
    adapter: PromptAdapter  # the best checkpoint
    best: EvalPoint
    history: list[EvalPoint] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0
    trainable_parameters: int = 0
    final_train_loss: float = float("nan")


def initial_prompt(backbone: Backbone, config: TrainConfig) -> torch.Tensor:
    weight = backbone.model.get_input_embeddings().weight
    if config.init_text:
        ids = backbone.tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
        return text_init(weight, ids, config.prompt_length)
    generator = torch.Generator().manual_seed(config.seed)
    special = set(getattr(backbone.tokenizer, "all_special_ids", []) or [])
    return vocab_init(weight, config.prompt_length, generator, special)


@torch.no_grad()
def evaluate_loss(backbone: Backbone, method: PromptMethod, examples: list[Example], batch_size: int,
                  pad_id: int, step: int) -> EvalPoint:
    prompt, offset = method.prompt(), method.offset()
    loss, tokens, exact = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        loss_sum, row_exact = prompt_forward(backbone, prompt, offset, chunk, pad_id)
        loss += float(loss_sum)
        tokens += sum(len(e.target_ids) for e in chunk)
        exact += int(row_exact.sum())
    return EvalPoint(step, loss / tokens, exact / len(examples))


def _better(candidate: EvalPoint, best: EvalPoint | None) -> bool:
    if best is None:
        return True
    return (candidate.exact_match, -candidate.loss) > (best.exact_match, -best.loss)


def make_optimizer(method: PromptMethod, config: TrainConfig) -> torch.optim.Optimizer:
    """Adafactor with parameter scaling (the default) makes each step relative to the tensor's RMS.

    That is what lets one learning rate (0.3, as in the paper) fit factors of very different
    scales: Q holds singular values (~tens) while U and V are orthonormal (~0.1 and ~0.04 per
    entry here). Plain AdamW moves every entry by ~lr, so at 0.3 it wrecks U and V at once.
    """
    if config.optimizer == "adamw":
        return torch.optim.AdamW(method.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    from transformers.optimization import Adafactor

    return Adafactor(method.parameters(), lr=config.learning_rate, scale_parameter=True, relative_step=False,
                     warmup_init=False, weight_decay=config.weight_decay)


def _lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _freeze(backbone: Backbone) -> None:
    backbone.model.requires_grad_(False)
    if any(p.requires_grad for p in backbone.model.parameters()):
        raise TrainingError("backbone parameters still require grad; refusing to train them")


@contextlib.contextmanager
def _differentiable_4bit_layers(model: torch.nn.Module):
    """Keep bitsandbytes 4-bit layers on their differentiable path while training.

    On CPU, a `Linear4bit` in eval mode repacks its weight for a faster inference kernel on the
    first forward without grad (our held-out evals), and that kernel has no backward: every later
    step got an exactly-zero gradient (measured, bitsandbytes 0.50.2). Marking just those modules
    as training skips the repacking; they hold no dropout, so their outputs do not change.
    """
    four_bit = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")]
    for module in four_bit:
        module.training = True
    try:
        yield
    finally:
        for module in four_bit:
            module.training = False


def _check_gradient(backbone: Backbone, grad_norm: torch.Tensor, loss: float, step: int) -> None:
    """Stop when no usable gradient reached the prompt: with a loss clearly above zero, a zero
    (or non-finite) gradient means the backbone did not pass gradients back to its inputs.

    Seen with bitsandbytes nf4 on CPU before `_differentiable_4bit_layers`: a gradient at the
    first step, exactly zero after the first held-out eval. A backbone without a backward path to
    its input embeddings fails here at the first step.
    """
    value = float(grad_norm)
    if math.isfinite(value) and (value > 0 or loss < SATURATED_LOSS):
        return
    options = backbone.options
    raise TrainingError(
        f"step {step}: the gradient reaching the soft prompt is {value} through this backbone "
        f"(quantization={options.quantization}, dtype={options.dtype}, device={options.device}); it cannot "
        "train the prompt: its layers do not pass gradients back to the input embeddings. Train with "
        "--quantization none (the adapter serves on any quantization of the same base model)."
    )


def _provenance(config: TrainConfig, method: PromptMethod, best: EvalPoint, steps: int, seconds: float,
                train_rows: int, eval_rows: int, held_out: bool) -> dict:
    """What goes into the adapter's metadata: how it was made and how it scored."""
    extra = {
        "method": config.method,
        "l": config.prompt_length,
        "p": config.pool,
        "trainable_parameters": method.trainable_parameters,
        "seed": config.seed,
        "optimizer": config.optimizer,
        "learning_rate": config.learning_rate,
        "steps": steps,
        "best_step": best.step,
        "batch_size": config.batch_size,
        "train_rows": train_rows,
        "train_seconds": f"{seconds:.1f}",
        "eval_rows": eval_rows,
        "eval_loss": f"{best.loss:.4f}",
        "eval_exact_match": f"{best.exact_match:.4f}",
        "eval_on": "eval" if held_out else "train",
        "init": "text" if config.init_text else "vocab",
        # Clients must send their input in this shape (see lamp_runtime/tasks/format.py).
        "input_template": INPUT_TEMPLATE,
    }
    if config.method in ("lamp", "ept"):
        extra["r"] = config.rank
    if config.method == "ept":
        extra.update(offset_tokens=config.ept.offset_tokens, spaces=config.ept.spaces,
                     projection_rank=config.ept.projection_rank)
    return extra


def train(backbone: Backbone, train_examples: list[Example], eval_examples: list[Example] | None,
          config: TrainConfig, meta: AdapterMeta, progress: bool = True) -> TrainResult:
    """Train a soft prompt; return the checkpoint with the best eval exact match (lowest loss on ties).

    Without eval examples, the last step's prompt is returned and scored on the training rows.
    `meta` supplies task/base model/description; the trainer adds its settings and metrics to
    `meta.extra` so the saved file says how it was made.
    """
    if not train_examples:
        raise ValueError("no training examples")
    _freeze(backbone)
    method = build_method(config.method, initial_prompt(backbone, config), config.rank, config.pool,
                          config.ept, config.seed)
    pad_id = backbone.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = backbone.tokenizer.eos_token_id
    total = config.total_steps(len(train_examples))
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, total // 10)
    optimizer = make_optimizer(method, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, total))
    order_rng = random.Random(f"order:{config.seed}")
    per_epoch = math.ceil(len(train_examples) / config.batch_size)
    eval_every = config.eval_every or per_epoch
    scored = eval_examples or train_examples

    history: list[EvalPoint] = []
    best_point, best_state = None, None
    smoothed = None
    started = time.perf_counter()
    with _differentiable_4bit_layers(backbone.model):
        bar = tqdm(total=total, desc=f"train {config.method} p={config.pool}", disable=not progress,
                   unit="step", dynamic_ncols=True)
        step = 0
        while step < total:
            order = list(range(len(train_examples)))
            order_rng.shuffle(order)
            for start in range(0, len(order), config.batch_size):
                if step >= total:
                    break
                chunk = [train_examples[i] for i in order[start : start + config.batch_size]]
                loss_sum, _ = prompt_forward(backbone, method.prompt(), method.offset(), chunk, pad_id)
                loss = loss_sum / sum(len(e.target_ids) for e in chunk)
                value = loss.item()
                if not math.isfinite(value):
                    raise TrainingError(f"training loss became {value} at step {step + 1}; lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(method.parameters(), config.max_grad_norm)
                _check_gradient(backbone, grad_norm, value, step + 1)
                optimizer.step()
                schedule.step()
                step += 1
                smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
                bar.update(1)
                bar.set_postfix(loss=f"{smoothed:.3f}", lr=f"{schedule.get_last_lr()[0]:.3g}")
                if step % eval_every == 0 or step == total:
                    point = evaluate_loss(backbone, method, scored, config.eval_batch_size, pad_id, step)
                    history.append(point)
                    bar.write(f"step {step}: eval loss {point.loss:.4f}, exact match {point.exact_match:.3f}")
                    if _better(point, best_point):
                        best_point = point
                        best_state = {k: t.detach().clone() for k, t in method.state_dict().items()}
        bar.close()
    seconds = time.perf_counter() - started
    method.load_state_dict(best_state)
    extra = _provenance(config, method, best_point, step, seconds, len(train_examples), len(scored),
                        bool(eval_examples))
    extra[TRAINED_ON_KEY] = numerics(backbone.options)
    adapter = method.to_adapter(AdapterMeta(pool=config.pool, base_model=meta.base_model, task=meta.task,
                                            description=meta.description, extra={**meta.extra, **extra}))
    return TrainResult(adapter, best_point, history, step, seconds, method.trainable_parameters,
                       smoothed if smoothed is not None else float("nan"))


def save_checked(adapter: PromptAdapter, path: str | Path, hidden_size: int) -> Path:
    """Write an adapter atomically, after proving it loads the way the server will load it.

    The file is written next to its destination under a name no adapter scan picks up (not
    `*.safetensors`), parsed and validated exactly as `load_adapter` does, and only then renamed
    into place, so a server scanning `prompts/` never sees a half-written or invalid file.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"adapter files must end in .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        save_adapter(adapter, tmp_name)
        os.chmod(tmp_name, 0o644)  # the temp file is private (0600); an adapter is not a secret
        validate(adapter_from_safetensors(Path(tmp_name).read_bytes(), path.name), hidden_size, AdapterLimits())
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path
