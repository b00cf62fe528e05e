"""``jev4 qat``: train one task's LoRA (A and B of every adapted module, the projector's included) with the backbone frozen.

The loop is plain PyTorch: the reference encoder's own network and
preprocessing (``TorchEncoder.compute`` is its forward with autograd on),
AdamW over the chosen task's LoRA slices, InfoNCE over quantized embeddings
(``jev4.qat.loss``), evaluation on the held-out split every ``eval_every``
steps with the same codecs as post-training quantization, and the best
adapter kept. Batches are a pure function of the seed and the step, and
LoRA has no dropout here, so a run resumed from a checkpoint continues
exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from jev4.errors import EncodeError, Jev4Error
from jev4.model.checkpoint import resolve_model_dir
from jev4.model.config import JinaV4Config, load_config
from jev4.model.encoder import TorchEncoder
from jev4.model.lora import MultiTaskLoRALinear
from jev4.model.preprocess import load_image, text_prefix
from jev4.qat.data import Item, Pair, PairSplit, load_split
from jev4.qat.loss import QAT_PRECISIONS, Quantizer, maxsim_loss, qat_loss
from jev4.quant.embeddings import STE_GRADIENTS, Calibration, EmbeddingCodec, calibrate
from jev4.validate.metrics import retrieval_metrics

log = logging.getLogger(__name__)

STATE_DIR_SUFFIX = ".qat-state"


class QATError(Jev4Error, ValueError):
    """Settings that cannot train (unknown precision or task, a model without adapters...)."""


MAX_SEED = 2**63 - 1  # torch.manual_seed and numpy's SeedSequence take seeds in this range


def _positive_number(flag: str, value: object, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise QATError(f"{flag} {value!r}: must be a positive finite number ({hint})")


def _integer(flag: str, value: object, minimum: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise QATError(f"{flag} {value!r}: must be an integer >= {minimum}" + (f" ({why})" if why else ""))


def parse_matryoshka_dims(dims: str | Sequence[int | str] | None) -> tuple[int, ...]:
    """``--matryoshka-dims``: ``"128,256"``, or a sequence of ints (or digit strings); each must be an integer >= 1.

    Whether each dim is one the checkpoint was trained at is checked against
    its config.json (``check_matryoshka_dims``), before the model loads.
    """
    if dims is None:
        return ()
    parts = [p.strip() for p in dims.split(",")] if isinstance(dims, str) else list(dims)
    if isinstance(dims, str) and not dims.strip():
        return ()
    out = []
    for part in parts:
        value = part
        if isinstance(part, str):
            try:
                value = int(part)
            except ValueError:
                value = None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            shown = value if isinstance(value, int) and not isinstance(value, bool) else repr(part)
            raise QATError(f"--matryoshka-dims {_show(dims)}: {shown} is not a dimension; give comma-separated integers >= 1, e.g. 128,256")
        out.append(value)
    return tuple(out)


def _show(dims: object) -> str:
    return dims if isinstance(dims, str) else ",".join(str(d) for d in dims)


def check_matryoshka_dims(config: JinaV4Config, dims: Sequence[int]) -> None:
    """Each dim must be a Matryoshka dim of the checkpoint (or its full size)."""
    for d in dims:
        try:
            config.check_truncate_dim(d)
        except EncodeError:
            raise QATError(
                f"--matryoshka-dims {_show(dims)}: {d} is not a Matryoshka dim of this checkpoint; "
                f"choose from {sorted(config.matryoshka_dims)} (or {config.hidden_size}, the full size)"
            ) from None


@dataclass(frozen=True)
class QATSettings:
    """Options of ``jev4 qat``; recorded in the output's manifest."""

    model: str
    adapter: str
    precision: str | None  # binary | ternary | int4 | int8; None trains in float (the PTQ baseline)
    data: str  # JSONL pairs/triplets or "stdlib-code"
    out: str
    quantize: str = "docs"  # docs | both
    scaling: str = "minmax"  # minmax | rolling
    # Also accepts the flag's text ("128,256") or a sequence of ints / digit strings; each dim is checked and the
    # field holds a tuple of ints after __post_init__.
    matryoshka_dims: tuple[int, ...] = ()
    steps: int = 200
    batch_size: int = 16
    lr: float = 5e-4
    temperature: float = 0.05
    multivector_weight: float = 0.5  # weight of the MaxSim InfoNCE term; it is what trains the projector's LoRA
    # Weight of the same InfoNCE on the float embeddings beside the quantized one. The sign's straight-through
    # gradient alone is noisy (binary QAT on the tiny model did not learn at all without it); the float term
    # keeps the task signal while the quantized term shapes where the codes fall.
    float_weight: float = 1.0
    # The straight-through estimator's backward (jev4.quant.embeddings.ste_gradient_scale): identity everywhere,
    # clipped to the codec's output range, or tanh-shaped around each decision boundary (binary, ternary).
    ste: str = "identity"
    error_weight: float = 0.0  # weight of the quantization-error penalty (values pulled onto their codes)
    momentum: float = 0.99
    eval_every: int = 50
    held_out: int = 200
    data_size: int | None = None
    max_length: int = 128
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    gradient_checkpointing: bool = False
    adapter_dir: str | None = None
    resume: bool = False
    force: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in QAT_PRECISIONS:
            raise QATError(f"--precision {self.precision!r}: choose one of {', '.join(QAT_PRECISIONS)}")
        if self.quantize not in ("docs", "both"):
            raise QATError(f"--quantize {self.quantize!r}: choose docs or both")
        if self.ste not in STE_GRADIENTS:
            raise QATError(f"--ste {self.ste!r}: choose one of {', '.join(STE_GRADIENTS)}")
        if self.ste == "tanh" and self.precision not in ("binary", "ternary"):
            raise QATError(f"--ste tanh is for binary and ternary, not {self.precision}")
        if self.scaling not in ("minmax", "rolling"):
            raise QATError(f"--scaling {self.scaling!r}: choose minmax or rolling")
        _positive_number("--lr", self.lr, "e.g. 5e-4")
        _positive_number("--temperature", self.temperature, "e.g. 0.05; a negative one would invert the loss")
        for flag, value in (("--float-weight", self.float_weight), ("--error-weight", self.error_weight), ("--multivector-weight", self.multivector_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise QATError(f"{flag} {value!r}: must be a finite number >= 0 (0 turns the term off)")
        m = self.momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= 1:  # NaN fails the range too
            raise QATError(f"momentum {m!r}: must be a number between 0 and 1")
        _integer("--steps", self.steps, 1)
        _integer("--eval-every", self.eval_every, 1)
        _integer("--batch-size", self.batch_size, 2, "in-batch negatives need at least 2 pairs per batch")
        _integer("--held-out", self.held_out, 1)
        if self.data_size is not None:
            _integer("--data-size", self.data_size, 1, "or leave it out to use every pair")
        _integer("--max-length", self.max_length, 1)
        _integer("--seed", self.seed, 0)
        if self.seed > MAX_SEED:
            raise QATError(f"--seed {self.seed}: must be between 0 and {MAX_SEED}")
        object.__setattr__(self, "matryoshka_dims", parse_matryoshka_dims(self.matryoshka_dims))

    @property
    def state_dir(self) -> Path:
        return Path(str(self.out).rstrip("/") + STATE_DIR_SUFFIX)


@dataclass
class QATResult:
    history: list[dict] = field(default_factory=list)  # {"step", "loss"} and eval rows {"step", "ndcg@10", ...}
    best: dict = field(default_factory=dict)
    out: Path | None = None
    calibration: Calibration | None = None  # --scaling rolling: the statistics the best adapter was evaluated with


def lora_modules(encoder: TorchEncoder) -> dict[str, MultiTaskLoRALinear]:
    return {name: m for name, m in encoder.network.named_modules() if isinstance(m, MultiTaskLoRALinear)}


def freeze_all_but(encoder: TorchEncoder, task: str) -> list[torch.nn.Parameter]:
    """Freeze everything; return the LoRA A/B parameters (their ``task`` slice is what trains)."""
    if encoder.selector is None or task not in encoder.selector.tasks:
        raise QATError(f"task {task!r}: the model's adapters have {list(encoder.tasks)}")
    for p in encoder.network.parameters():
        p.requires_grad_(False)
    params = []
    for module in lora_modules(encoder).values():
        for p in (module.lora_A, module.lora_B):
            p.requires_grad_(True)
            params.append(p)
    return params


def mask_other_tasks(params: list[torch.nn.Parameter], index: int) -> None:
    """Zero the gradient of every task slice but ``index`` (the stacked A/B hold all tasks)."""
    for p in params:
        if p.grad is not None:
            keep = p.grad[index].clone()
            p.grad.zero_()
            p.grad[index] = keep


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The training rows of ``step``: a seeded permutation per epoch, so any step can be recomputed."""
    rows = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        rows.append(int(np.random.default_rng([seed, epoch]).permutation(n)[offset]))
    return rows


def embed(encoder: TorchEncoder, items: list[Item], task: str, prompt: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Single vectors [N, H], multi-vectors [N, T, P] and their token mask [N, T], with autograd.

    Texts and images run as separate batches and are put back in input order
    (multi-vectors padded to the longest).
    """
    singles: list[torch.Tensor | None] = [None] * len(items)
    multis: list[torch.Tensor | None] = [None] * len(items)
    texts = [i for i, it in enumerate(items) if not it.is_image]
    images = [i for i, it in enumerate(items) if it.is_image]
    groups = []
    if texts:
        prompted = [text_prefix(task, prompt) + items[i].value for i in texts]
        groups.append((texts, encoder.preprocessor.text_inputs(prompted, max_length)))
    if images:
        groups.append((images, encoder.preprocessor.image_inputs([load_image(items[i].value) for i in images])))
    for rows, inputs in groups:
        single, multi = encoder.compute(inputs, [task] * len(rows))
        mask = inputs.attention_mask.to(multi.device).bool()
        for row, i in enumerate(rows):
            singles[i] = single[row]
            multis[i] = multi[row][mask[row]]
    longest = max(m.shape[0] for m in multis)
    padded = torch.stack([F.pad(m, (0, 0, 0, longest - m.shape[0])) for m in multis])
    token_mask = torch.stack([torch.arange(longest, device=padded.device) < m.shape[0] for m in multis])
    return torch.stack(singles), padded, token_mask


def _encode_eval(encoder: TorchEncoder, items: list[Item], task: str, prompt: str, max_length: int, batch_size: int) -> np.ndarray:
    with torch.no_grad():
        parts = [embed(encoder, items[i : i + batch_size], task, prompt, max_length)[0] for i in range(0, len(items), batch_size)]
    return torch.cat(parts).float().cpu().numpy()


def quantized_metrics(
    queries: np.ndarray, documents: np.ndarray, precision: str | None, quantize_queries: bool, calibration: Calibration | None = None
) -> dict[str, float]:
    """Retrieval metrics (query i's positive is document i) with the documents (and queries) through the codec.

    Without a ``calibration`` every codec is calibrated on the documents
    (binary: centred per dim), as a post-training quantization of the same
    index would be; ``--scaling rolling`` passes the statistics training used.
    """
    qrels = [{i: 1.0} for i in range(len(queries))]
    if precision is None:
        return retrieval_metrics(queries @ documents.T, qrels)
    cal = calibration if calibration is not None else calibrate(documents, precision)  # binary too: centred per dim, as in training
    codec = EmbeddingCodec(precision, cal)
    docs = codec.decode(codec.encode(documents))
    q = codec.decode(codec.encode(queries)) if quantize_queries else queries
    docs = docs / np.maximum(np.linalg.norm(docs, axis=1, keepdims=True), 1e-12)
    return retrieval_metrics(q @ docs.T, qrels)


def evaluate_split(
    encoder: TorchEncoder, pairs: list[Pair], settings: QATSettings, precision: str | None, calibration: Calibration | None = None
) -> dict[str, float]:
    """nDCG@10 etc. on the held-out pairs: float, and through ``precision`` when given (``calibration``: see quantized_metrics)."""
    q = _encode_eval(encoder, [p.query for p in pairs], settings.adapter, "query", settings.max_length, settings.batch_size)
    d = _encode_eval(encoder, [p.positive for p in pairs], settings.adapter, "passage", settings.max_length, settings.batch_size)
    result = {f"float/{k}": v for k, v in quantized_metrics(q, d, None, False).items()}
    if precision is not None:
        result.update({f"quantized/{k}": v for k, v in quantized_metrics(q, d, precision, settings.quantize == "both", calibration).items()})
    return result


def _trained_tensors(encoder: TorchEncoder, index: int) -> dict[str, torch.Tensor]:
    """The trained task's A/B per module, keyed ``<module>.lora_A`` / ``.lora_B`` (fp32, contiguous copies)."""
    out = {}
    for name, module in lora_modules(encoder).items():
        out[f"{name}.lora_A"] = module.lora_A[index].detach().float().cpu().contiguous().clone()
        out[f"{name}.lora_B"] = module.lora_B[index].detach().float().cpu().contiguous().clone()
    return out


def _load_trained(encoder: TorchEncoder, index: int, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, module in lora_modules(encoder).items():
            module.lora_A[index].copy_(tensors[f"{name}.lora_A"])
            module.lora_B[index].copy_(tensors[f"{name}.lora_B"])


def _save_state(settings: QATSettings, step: int, encoder: TorchEncoder, index: int, optimizer: torch.optim.Optimizer, params, quantizer: Quantizer, result: QATResult, best: dict) -> None:
    """Checkpoint: trained LoRA, Adam moments, the best adapter so far (safetensors) and the rest (JSON). No pickle."""
    tmp = settings.state_dir.with_name(settings.state_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_trained_tensors(encoder, index), str(tmp / "lora.safetensors"))
    moments = {}
    for i, p in enumerate(params):
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                moments[f"{i}.{key}"] = state[key].detach().cpu().contiguous()
        if "step" in state:
            moments[f"{i}.step"] = torch.as_tensor(state["step"]).detach().cpu().reshape(1).float()
    save_file(moments, str(tmp / "optimizer.safetensors"))
    if best.get("tensors"):
        save_file(best["tensors"], str(tmp / "best.safetensors"))
    meta = {
        "step": step,
        "history": result.history,
        "best": {k: v for k, v in best.items() if k != "tensors"},
        "rolling": quantizer.state_json(),
        "settings": asdict(settings),
    }
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(settings.state_dir, ignore_errors=True)
    tmp.rename(settings.state_dir)


def _load_state(settings: QATSettings, encoder: TorchEncoder, index: int, optimizer: torch.optim.Optimizer, params, quantizer: Quantizer, result: QATResult) -> tuple[int, dict]:
    root = settings.state_dir
    meta = json.loads((root / "state.json").read_text())
    _load_trained(encoder, index, load_file(str(root / "lora.safetensors")))
    moments = load_file(str(root / "optimizer.safetensors"))
    for i, p in enumerate(params):
        if f"{i}.exp_avg" in moments:
            optimizer.state[p] = {
                "step": moments[f"{i}.step"].reshape(()),
                "exp_avg": moments[f"{i}.exp_avg"].to(p.device),
                "exp_avg_sq": moments[f"{i}.exp_avg_sq"].to(p.device),
            }
    quantizer.load_state_json(meta["rolling"], settings.device)
    result.history = meta["history"]
    best = dict(meta["best"])
    if (root / "best.safetensors").is_file():
        best["tensors"] = load_file(str(root / "best.safetensors"))
    log.info("resumed from %s at step %d", root, meta["step"])
    return int(meta["step"]), best


@dataclass
class TrainingState:
    """What one training step needs: the encoder with its trainable LoRA, the optimizer and the quantizer."""

    encoder: TorchEncoder
    params: list[torch.nn.Parameter]
    index: int  # the trained task's slice of the stacked LoRA tensors
    optimizer: torch.optim.Optimizer
    quantizer: Quantizer
    dims: tuple[int, ...]  # full size first, then the Matryoshka dims in the loss


def prepare(settings: QATSettings) -> TrainingState:
    """Load the model, freeze all but the task's LoRA, and build the optimizer and quantizer."""
    torch.manual_seed(settings.seed)
    config = load_config(resolve_model_dir(settings.model))
    config.check_task(settings.adapter)
    check_matryoshka_dims(config, settings.matryoshka_dims)  # before the weights load
    encoder = TorchEncoder.from_pretrained(settings.model, dtype=settings.dtype, device=settings.device, adapter_dir=settings.adapter_dir)
    params = freeze_all_but(encoder, settings.adapter)
    index = encoder.selector.tasks.index(settings.adapter)
    if settings.gradient_checkpointing:
        # Non-reentrant checkpointing: the frozen embeddings give inputs without grad, and the
        # reentrant variant would then drop the LoRA gradients inside each checkpointed layer.
        encoder.network.model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    encoder.network.train()
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    quantizer = Quantizer(settings.precision, settings.scaling, settings.momentum, gradient=settings.ste)
    check_matryoshka_dims(encoder.config, settings.matryoshka_dims)
    dims = tuple(sorted({encoder.config.hidden_size, *settings.matryoshka_dims}, reverse=True))
    return TrainingState(encoder, params, index, optimizer, quantizer, dims)


def train_step(state: TrainingState, settings: QATSettings, rows: list[Pair], step: int = 0) -> float:
    """One optimizer step on ``rows``; returns the loss."""
    encoder, quantizer = state.encoder, state.quantizer
    queries, query_tokens, query_mask = embed(encoder, [p.query for p in rows], settings.adapter, "query", settings.max_length)
    doc_items = [p.positive for p in rows] + [p.negative for p in rows if p.negative is not None]
    documents, doc_tokens, doc_mask = embed(encoder, doc_items, settings.adapter, "passage", settings.max_length)
    both = settings.quantize == "both"
    loss = qat_loss(queries, documents, quantizer, both, settings.temperature, state.dims, settings.error_weight)
    if settings.float_weight and settings.precision is not None:
        loss = loss + settings.float_weight * qat_loss(queries, documents, Quantizer(None), False, settings.temperature, state.dims)
    if settings.multivector_weight:
        multi = maxsim_loss(query_tokens, query_mask, doc_tokens, doc_mask, quantizer, both, settings.temperature)
        loss = loss + settings.multivector_weight * multi
    value = float(loss.item())
    if not math.isfinite(value):
        raise QATError(f"step {step}: loss is {value} (lower --lr?)")
    state.optimizer.zero_grad(set_to_none=True)
    # Checkpointed layers re-run in backward, after compute()'s per-batch task selection has ended:
    # one label for the whole batch keeps the task's LoRA selected there.
    with encoder.selector.select([settings.adapter], settings.device):
        loss.backward()
    mask_other_tasks(state.params, state.index)
    state.optimizer.step()
    return value


def train(settings: QATSettings, split: PairSplit | None = None) -> tuple[QATResult, TorchEncoder]:
    """Run QAT; returns the history and the encoder holding the best adapter (not yet written)."""
    split = split or load_split(settings.data, settings.held_out, settings.seed, settings.data_size)
    state = prepare(settings)
    encoder, params, index, optimizer, quantizer = state.encoder, state.params, state.index, state.optimizer, state.quantizer
    hidden = encoder.config.hidden_size
    result = QATResult()
    start, best = 0, {}
    if settings.resume and (settings.state_dir / "state.json").is_file():
        start, best = _load_state(settings, encoder, index, optimizer, params, quantizer, result)
    if start == 0:  # the starting point, for the curve and for "did training help"
        encoder.network.eval()
        result.history.append({"step": 0, **evaluate_split(encoder, split.held_out, settings, settings.precision)})
        encoder.network.train()
    steps = range(start, settings.steps)
    if settings.progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"qat {settings.precision or 'float'}", unit="step", initial=start, total=settings.steps)
    for step in steps:
        rows = [split.train[i] for i in batch_indices(step, settings.batch_size, len(split.train), settings.seed)]
        loss = train_step(state, settings, rows, step)
        result.history.append({"step": step + 1, "loss": loss})
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            encoder.network.eval()
            calibration = quantizer.calibration("single", hidden)  # rolling: what training quantized against
            metrics = evaluate_split(encoder, split.held_out, settings, settings.precision, calibration)
            encoder.network.train()
            key = "quantized/ndcg@10" if settings.precision else "float/ndcg@10"
            result.history.append({"step": step + 1, **metrics})
            log.info("step %d: loss %.4f, %s", step + 1, loss, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("ndcg@10")))
            if not best or metrics[key] > best["score"]:
                best = {"step": step + 1, "score": metrics[key], "metric": key, "metrics": metrics, "tensors": _trained_tensors(encoder, index)}
                if calibration is not None:
                    best["calibration"] = calibration.to_json()
            _save_state(settings, step + 1, encoder, index, optimizer, params, quantizer, result, best)
    if best.get("tensors"):
        _load_trained(encoder, index, best["tensors"])
    encoder.network.eval()
    if best.get("calibration"):
        result.calibration = Calibration.from_json(best["calibration"])
    result.best = {k: v for k, v in best.items() if k not in ("tensors", "calibration")}
    return result, encoder
