"""Sampling code sequences from the trained Transformer, with a static KV cache.

Per batch: one prefill of the class tokens, then D-1 cached decode steps, each a
few small GEMMs plus ``decode_attention`` over the cached prefix, through
:meth:`GPT.decode_step` (one function per step, no module calls). Nothing is
allocated per step beyond the step's own activations; the caches are allocated
once per batch size, and small ones are kept on the model for the next call.

Reproducibility: every jet draws its uniforms from its own generator, seeded from
``(seed, index of the jet)``, and codes are drawn by inverting the CDF with them.
So a jet depends on the seed and its index, not on ``batch_size``: any batch size
gives the same jets (up to the last-bit differences GEMMs may show between batch
sizes, which can very rarely flip a draw that sits on a CDF boundary).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from tqdm.auto import tqdm

from jetfast.data.format import CLASS_NAMES
from jetfast.errors import InvalidArgument
from jetfast.models.gpt import GPT, decode_n_tokens, prefill
from jetfast.ops import code_dtype_for
from jetfast.seeding import jet_uniforms

__all__ = ["sample", "class_labels", "kinematic_requests", "check_sampling", "PRECISIONS", "precision_dtype"]

# The dtype of the sampler's GEMMs and KV cache; layer norms, the softmax, the logits and the
# draws are fp32 in both (see GPT.decode_step).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Caches up to this size stay on the model between calls of one batch size (sampling one jet
# at a time, or a writer's blocks), with the weights packed for them; larger ones are freed,
# as they may hold gigabytes. A fresh cache costs its first touch (the kernel zeroing its
# pages): measured at batch 100 of the default model (105 MB), 0.5 ms of a 6.6 ms jet.
_KEPT_CACHE_BYTES = 256 << 20

_CLASS_IDS = {name: label for label, name in CLASS_NAMES.items()}
def class_labels(cls, n: int, num_classes: int) -> torch.Tensor:
    """Class labels (n,) int64 from a name, an int, or per-jet labels; -1 = unconditional."""
    names = ", ".join(f"{name!r}" for name in _CLASS_IDS)

    def check(label: int) -> int:
        if not -1 <= label < num_classes:
            raise InvalidArgument(
                f"sample: class {label} was not trained (the model knows labels 0..{num_classes - 1}; "
                "-1 or None means unconditional)"
            )
        return label

    if cls is None:
        return torch.full((n,), -1, dtype=torch.int64)
    if isinstance(cls, str):
        key = cls.strip().lower()
        if key in ("unconditional", "none", "any"):
            return torch.full((n,), -1, dtype=torch.int64)
        if key not in _CLASS_IDS:
            raise InvalidArgument(f"sample: unknown class {cls!r}; use one of {names}, 'unconditional', or an int label")
        return torch.full((n,), check(_CLASS_IDS[key]), dtype=torch.int64)
    if isinstance(cls, bool):
        raise TypeError("sample: cls must be a class name, an int label or per-jet labels, not a bool")
    if isinstance(cls, (int, np.integer)):
        return torch.full((n,), check(int(cls)), dtype=torch.int64)
    labels = torch.as_tensor(np.asarray(cls) if not isinstance(cls, torch.Tensor) else cls)
    if labels.dtype.is_floating_point:
        if not torch.equal(labels, labels.round()):
            raise InvalidArgument("sample: per-jet class labels must be whole numbers (1 = quark, 0 = gluon)")
    elif labels.dtype == torch.bool or labels.dtype.is_complex:
        raise TypeError(f"sample: per-jet class labels must be integers; got {labels.dtype}")
    labels = labels.to(torch.int64).reshape(-1).cpu()
    if labels.numel() != n:
        raise InvalidArgument(f"sample: got {labels.numel()} per-jet class labels for n={n} jets")
    if labels.numel():
        check(int(labels.min()))
        check(int(labels.max()))
    return labels


def kinematic_requests(model: GPT | None, n: int, pt=None, mass=None, allow_extrapolation: bool = False, ranges=None):
    """The requested (pT, mass) (n, 2) float32 in GeV (NaN where not given) from scalars or per-jet
    arrays, or None when neither is given; refused outside the training jets' range (the model's,
    or ``ranges`` ((pt lo, hi), (mass lo, hi)) when given) unless ``allow_extrapolation``."""
    if pt is None and mass is None:
        return None
    if ranges is None and not model.config.kinematic:
        raise InvalidArgument("sample: this Transformer was trained without pT/mass conditioning (its codes carried "
                              "no pt and m0); sample without pt= and mass=, or retrain it on codes that carry them")
    columns = []
    ranges = np.asarray(model.kinematic_range.detach().cpu().double() if ranges is None else ranges, np.float64)
    for name, value, (low, high), smallest in (("pt", pt, ranges[0], "> 0"), ("mass", mass, ranges[1], ">= 0")):
        if value is None:
            columns.append(np.full(n, np.nan))
            continue
        if isinstance(value, bool):
            raise TypeError(f"sample: {name} must be a number or per-jet numbers in GeV, not a bool")
        values = np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64).reshape(-1)
        if values.size == 1:
            values = np.full(n, values[0])
        if values.size != n:
            raise InvalidArgument(f"sample: got {values.size} per-jet values of {name} for n={n} jets")
        with np.errstate(invalid="ignore"):  # NaN: not given for that jet
            bad = np.isinf(values) | ((values <= 0) if name == "pt" else (values < 0))
        if bad.any():
            raise InvalidArgument(f"sample: {name} must be finite and {smallest} GeV; got {values[bad][0]} (jet {int(np.argmax(bad))})")
        with np.errstate(invalid="ignore"):
            outside = (values < low) | (values > high)
        if outside.any() and not allow_extrapolation:
            raise InvalidArgument(
                f"sample: {name} = {values[outside][0]:.4g} GeV (jet {int(np.argmax(outside))}) is outside the range of the "
                f"jets the model was trained on, {low:.4g} to {high:.4g} GeV; pass allow_extrapolation=True "
                "(--allow-extrapolation) to generate there anyway"
            )
        columns.append(values)
    return torch.from_numpy(np.stack(columns, axis=1).astype(np.float32))


def check_sampling(vocab_size: int, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   greedy: bool = False) -> None:
    """Refuse sampling settings :func:`sample` cannot use with a vocabulary of ``vocab_size`` codes
    (``greedy`` needs no check), so that a caller can check them before it creates anything."""
    if not temperature > 0 or not np.isfinite(temperature):
        raise InvalidArgument(f"sample: temperature must be > 0 and finite; got {temperature} "
                              "(for the most probable code at every step use greedy=True or top_k=1)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= vocab_size):
        raise InvalidArgument(f"sample: top_k must be an int in [1, {vocab_size}] (the vocabulary); got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InvalidArgument(f"sample: top_p must be in (0, 1]; got {top_p}")


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a sampler precision name ("fp32" or "bf16")."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise InvalidArgument(f"sample: precision must be one of {', '.join(map(repr, PRECISIONS))}; got {precision!r}")
    return PRECISIONS[precision]


def _check_arguments(n, batch_size):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InvalidArgument(f"sample: n must be a non-negative int; got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InvalidArgument(f"sample: batch_size must be a positive int; got {batch_size!r}")


def _make_picker(temperature: float, top_k: int | None, top_p: float | None, greedy: bool, uniforms):
    """A ``pick(logits, column) -> codes`` for decode_n_tokens."""
    if greedy or top_k == 1:
        return lambda logits, column: logits.argmax(dim=-1)

    def pick(logits: torch.Tensor, column: int) -> torch.Tensor:
        logits = logits.float()
        if temperature != 1.0:
            logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if top_p is not None and top_p < 1.0:
            # Nucleus: the most probable codes whose mass first reaches top_p (at least one).
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        cdf = probs.cumsum_(dim=-1)
        # Inverse CDF; codes of zero probability own an empty interval and are never drawn.
        target = uniforms[:, column : column + 1] * cdf[:, -1:]
        return torch.searchsorted(cdf, target, right=True).squeeze_(1).clamp_(max=cdf.shape[-1] - 1)

    return pick


def sample(
    model: GPT,
    n: int,
    cls=None,
    pt=None,
    mass=None,
    allow_extrapolation: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int | None = None,
    batch_size: int = 512,
    device=None,
    progress: bool = False,
    precision: str = "fp32",
) -> torch.Tensor:
    """Generate ``n`` code sequences with the KV-cached Transformer.

    Args:
        model: a :class:`jetfast.models.gpt.GPT` (see :func:`jetfast.models.gpt.load_gpt`).
        n: number of jets.
        cls: "quark", "gluon", None / "unconditional", an int label (1 quark, 0 gluon),
            or per-jet labels of length n (-1 = unconditional).
        pt, mass: the jets' generator-level pT and mass in GeV (a model trained on codes that
            carry them): a number, or per-jet numbers of length n (NaN = not given); None
            leaves it free. Values outside the training jets' range are refused unless
            ``allow_extrapolation``.
        temperature: divides the logits (> 0).
        top_k: keep the k most probable codes at each step (1 = greedy).
        top_p: nucleus sampling, keep the most probable codes up to this mass, in (0, 1].
        greedy: take the most probable code at every step (deterministic).
        seed: jets depend on (seed, their index) only; None draws a fresh seed.
        batch_size: jets decoded together (memory: 8 * layers * batch * seq_len * d_model bytes of cache).
        device: where to run; default the model's device (the model is moved if needed).
        progress: show a tqdm bar.
        precision: "fp32", or "bf16" for the Transformer's GEMMs and KV cache (half the memory
            traffic; the layer norms, softmax, logits and the draws stay fp32). Fast where the CPU
            has bf16 instructions (AVX-512 BF16, AMX) or on a GPU.

    Returns:
        codes (n, seq_len) uint8 (int16/int32 for vocabularies above 256), on the CPU.
    """
    config = model.config
    _check_arguments(n, batch_size)
    check_sampling(config.vocab_size, temperature, top_k, top_p)
    n, batch_size = int(n), int(batch_size)
    dtype = precision_dtype(precision)
    labels = class_labels(cls, n, config.num_classes)
    kinematics = kinematic_requests(model, n, pt, mass, allow_extrapolation)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    device = next(model.parameters()).device if device is None else torch.device(device)
    model.to(device)
    codes = torch.empty((n, config.seq_len), dtype=code_dtype_for(config.vocab_size))
    if n == 0:
        return codes

    was_training = model.training
    model.eval()
    bar = tqdm(total=n, unit="jet", desc="sampling codes", disable=not progress)
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                count = min(batch_size, n - start)
                model.setup_caches(count, dtype=dtype)
                batch_codes = torch.empty((count, config.seq_len), dtype=torch.int64, device=device)
                uniforms = None if greedy else jet_uniforms(seed, start, count, config.seq_len).to(device)
                pick = _make_picker(temperature, top_k, top_p, greedy, uniforms)
                class_tokens = model.class_tokens(labels[start : start + count].to(device))
                requested = None if kinematics is None else kinematics[start : start + count].to(device)
                logits = prefill(model, class_tokens, requested)
                decode_n_tokens(model, logits, batch_codes, pick)
                codes[start : start + count] = model.to_latent(batch_codes).to("cpu", codes.dtype)
                bar.update(count)
    finally:
        bar.close()
        cache = model.blocks[0].attn.kv_cache
        if cache is None or 2 * len(model.blocks) * cache.k_cache.nbytes > _KEPT_CACHE_BYTES:
            model.clear_caches()
        model.condition_cache = None  # a later decode needs its own prefill
        model.train(was_training)
    return codes
