"""Class-conditional decoder-only Transformer over latent codes (stage 2).

A jet is a sequence of D codes (one per VAE latent dimension, each an index into
that dimension's bins). The sequence the model reads is

    [class_token, c_0, c_1, ..., c_{D-2}]   ->   predicts   [c_0, c_1, ..., c_{D-1}]

with one start token per class (gluon = vocab+0 for y=0, quark = vocab+1 for y=1)
plus an unconditional one (vocab+num_classes); training swaps the class token for
the unconditional one with probability ``p_uncond`` so one model does both. The class
is also added to every position (a learned vector per start token): every code sees it
directly, not only through attention back to position 0, which a small model trained
briefly learns for the first few codes only. A cached decode keeps the vectors of the
start tokens it was prefilled with.

With ``kinematic`` the model is also conditioned on the jet's generator-level pT and mass
(``log pT`` and ``log(1 + m / GeV)``, standardised by the training jets' values, which are saved
with the model with their range): a small MLP of the two values and two "given" flags is
added to the class vector. Training hides each value with probability ``p_uncond`` (as it
replaces the class token), so one model serves requests with a class, a pT, a mass, any of
them or none. A value that is not given is NaN.

Positions are learned. Without ``code_values`` position d+1 holds latent dimension d.
With ``code_values`` the model knows what each code stands for, the value of its bin center
(standardised per dimension, a table saved with the model), in three ways:

* it reads the dimensions widest first (by the spread of the training latents): a VAE uses
  a few of its latents and leaves the rest near constant, and with the used ones first, how
  they depend on each other is learned from short, nearby context rather than found among
  a hundred positions of noise (:meth:`GPT.to_sequence`, :meth:`GPT.to_latent`);
* it reads the value of every code beside the code's embedding;
* its logits for the next dimension get a quadratic in that dimension's bin values,
  ``a v + b v^2`` with ``a, b`` computed from the hidden state, so a Gaussian in the
  latent's value (the shape a VAE latent follows given the others) is two numbers away.

Codes are ordered values of a continuous latent, which plain embeddings would have to
discover from data; with the values, a model trained on a few thousand jets learns how one
latent follows from the others. Blocks are pre-LayerNorm.
Training and prefill use ``F.scaled_dot_product_attention`` with a causal mask;
decoding one token reads a static, preallocated KV cache through the op
``jetfast.ops.decode_attention`` (Triton on CUDA, a compiled kernel on the CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from jetfast._ext import HAS_NATIVE, _C
from jetfast.errors import InvalidArgument, RunDirError
from jetfast.kernels.linear import Packed, linear, mkl_bf16_gemm, mkl_gemm, pack
from jetfast.kernels.decode_attention import decode_attention_cpu
from jetfast.ops import decode_attention
from jetfast.run import checkpoint_file, load_checkpoint

__all__ = [
    "GPTConfig",
    "GPT",
    "KINEMATICS",
    "KVCache",
    "prefill",
    "decode_one_token",
    "decode_n_tokens",
    "load_gpt",
]

KINEMATICS = ("pt", "mass")  # the conditioning values of a kinematic model, in GeV
# A CPU decode step runs its blocks as one compiled call (jetfast._C.DecodeBlocks): ~70 framework
# ops per step from Python cost ~1 ms, more than the arithmetic below a few dozen sequences and a
# fifth of a step at a hundred. Below this many sequences its products are matrix-vector rows,
# bound by reading the weights; from here on they are MKL's GEMMs (fp32 on weights packed for the
# batch, bf16 on bf16 layer inputs).
MATVEC_MAX_ROWS = 16


def kinematic_features(values: torch.Tensor) -> torch.Tensor:
    """(pT, mass) (B, 2) in GeV -> (log pT, log(1 + mass)): log-like over the spectrum and finite at m = 0."""
    return torch.stack([torch.log(values[:, 0]), torch.log1p(values[:, 1])], dim=1)


def _versions(params) -> tuple:
    """What tells whether parameters changed: storage and version counter of each (an optimizer
    step moves the latter). Inference tensors, e.g. of a model made under torch.inference_mode,
    have no version counter."""
    return tuple((p.data_ptr(), None if p.is_inference() else p._version) for p in params)


@dataclass
class GPTConfig:
    vocab_size: int = 256  # bins per latent dimension
    seq_len: int = 128  # latent dimensions D
    d_model: int = 256
    n_heads: int = 8
    n_layers: int = 4
    dropout: float = 0.0
    num_classes: int = 2
    tie_weights: bool = False  # output head shares the code rows of the token embedding
    mlp_ratio: int = 4
    code_values: bool = False  # read each code's bin-center value too (see the module docstring)
    kinematic: bool = False  # conditioned on the jet's pT and mass too (see the module docstring)
    value_shift: bool = False  # code_values: a per-slot linear shift of each value by the condition

    def __post_init__(self):
        checks = {
            "vocab_size": self.vocab_size >= 2,
            "seq_len": self.seq_len >= 1,
            "d_model": self.d_model >= 1,
            "n_heads": self.n_heads >= 1 and self.d_model % max(self.n_heads, 1) == 0,
            "n_layers": self.n_layers >= 1,
            "dropout": 0.0 <= self.dropout < 1.0,
            "num_classes": self.num_classes >= 1,
            "mlp_ratio": self.mlp_ratio >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise InvalidArgument(f"GPTConfig: invalid {', '.join(bad)} in {self} (d_model must divide by n_heads)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def unconditional_token(self) -> int:
        return self.vocab_size + self.num_classes

    @property
    def num_tokens(self) -> int:
        """Embedding rows: codes, one start token per class, the unconditional one."""
        return self.vocab_size + self.num_classes + 1

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer, seen as (B, H, S_max, Dh).

    The storage is position-major, (S_max, B, H, Dh): a decode step's prefix is
    then one contiguous block for the attention kernel to stream, and writing a
    step's keys is one contiguous write.
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype=torch.float32, device=None):
        super().__init__()
        storage = (max_len, batch, heads, head_dim)
        # Not part of the state dict: caches are scratch space, rebuilt per sampling run.
        for name in ("k_cache", "v_cache"):
            # Uninitialised: nothing at or past a step's length is ever read.
            buffer = torch.empty(storage, dtype=dtype, device=device).permute(1, 2, 0, 3)
            self.register_buffer(name, buffer, persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, Dh) at positions [pos, pos+T); return the whole caches."""
        length = k.shape[2]
        self.k_cache[:, :, pos : pos + length] = k
        self.v_cache[:, :, pos : pos + length] = v
        return self.k_cache, self.v_cache


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.d_model = config.d_model
        # One matmul for q, k and v: the decode step is dominated by such small GEMMs.
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, pos: int | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = linear(x, self.qkv.weight, self.qkv.bias).view(batch, length, 3, self.n_heads, self.head_dim)
        if pos is not None and length == 1:
            # Decoding: one new token per sequence against the cache.
            q = qkv[:, 0, 0]  # (B, H, Dh)
            k_cache, v_cache = self.kv_cache.update(pos, qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2))
            y = decode_attention(q, k_cache, v_cache, pos + 1)  # (B, H, Dh)
            y = y.reshape(batch, 1, self.d_model)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, Dh)
            if pos is not None:
                if pos != 0:
                    raise ValueError(f"prefill of {length} tokens must start at position 0; got {pos}")
                self.kv_cache.update(pos, k, v)
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # (B, H, T, Dh)
            y = y.transpose(1, 2).reshape(batch, length, self.d_model)
        return self.resid_dropout(linear(y, self.proj.weight, self.proj.bias))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = linear(x, self.fc.weight, self.fc.bias, activation="gelu")
        return self.dropout(linear(hidden, self.proj.weight, self.proj.bias))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, pos: int | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), pos)
        return x + self.mlp(self.ln_2(x))

    def decode_step(self, x: torch.Tensor, pos: int, weights: tuple, packed: tuple | None = None) -> torch.Tensor:
        """:meth:`forward` of one token per sequence at ``pos`` against the cache, without the module
        calls: x (B, C) is the fp32 residual stream; ``weights`` are the GEMM operands (qkv, attention
        projection, MLP in and out, each weight then bias) in the cache's dtype; ``packed``, the four
        weights packed for B rows (:meth:`GPT.packed_weights`), or None."""
        qkv_w, qkv_b, proj_w, proj_b, fc_w, fc_b, out_w, out_b = weights
        qkv_p, proj_p, fc_p, out_p = packed or (None,) * 4
        attn, cache = self.attn, self.attn.kv_cache
        batch, width = x.shape
        low = qkv_w.dtype  # the GEMMs' dtype; layer norms and the residual stream stay fp32
        h = F.layer_norm(x, (width,), self.ln_1.weight, self.ln_1.bias, self.ln_1.eps).to(low)
        qkv = linear(h, qkv_w, qkv_b, packed=qkv_p).view(batch, 3, attn.n_heads, attn.head_dim)  # (B, 3, H, Dh)
        q, k, v = qkv.unbind(1)
        if x.device.type == "cpu":
            # The step's keys and values are appended by the attention kernel itself.
            y = decode_attention_cpu(q, cache.k_cache, cache.v_cache, pos + 1, k, v)  # (B, H, Dh)
        else:
            cache.k_cache[:, :, pos] = k
            cache.v_cache[:, :, pos] = v
            y = decode_attention(q, cache.k_cache, cache.v_cache, pos + 1)
        x = x + linear(y.reshape(batch, width), proj_w, proj_b, packed=proj_p)
        h = F.layer_norm(x, (width,), self.ln_2.weight, self.ln_2.bias, self.ln_2.eps).to(low)
        return x + linear(linear(h, fc_w, fc_b, activation="gelu", packed=fc_p), out_w, out_b, packed=out_p)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.num_tokens, config.d_model)
        self.pos_emb = nn.Parameter(torch.zeros(config.seq_len, config.d_model))
        self.class_emb = nn.Embedding(config.num_classes + 1, config.d_model)  # per start token, at every position
        # The condition of a cached decode, set by its prefill: vectors (B, 1, C) and features (B, F).
        self.condition_cache = None
        # Low-precision copies of the blocks' GEMM weights for cached decoding (see decode_weights).
        self._decode_weights = None
        # The blocks as one compiled call for small CPU batches (see fused_blocks), and the one
        # the current cached decode uses (set by its prefill).
        self._fused_blocks = None
        self._sequence_blocks = None
        # MKL packings of the fp32 GEMM weights for one batch size (see packed_weights), and the
        # ones the current cached decode uses (set by its prefill).
        self._packed_weights = None
        self._sequence_packed = None
        # The per-sequence terms of a cached decode (see _decode_terms) and the condition they were
        # made from, set by its first step.
        self._sequence_terms = None
        if config.kinematic:
            # Set by set_kinematics from the training jets: (log pT, log(1 + m)) mean and std, and the
            # range of (pT, m) in GeV, rows pT and mass, columns min and max.
            self.register_buffer("kinematic_mean", torch.zeros(len(KINEMATICS)))
            self.register_buffer("kinematic_std", torch.ones(len(KINEMATICS)))
            self.register_buffer("kinematic_range", torch.tensor([[0.0, math.inf]] * len(KINEMATICS)))
            self.kinematic_emb = nn.Sequential(nn.Linear(2 * len(KINEMATICS), config.d_model), nn.GELU(),
                                               nn.Linear(config.d_model, config.d_model))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = None if config.tie_weights else nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.code_values:
            # order[p]: the latent dimension at sequence slot p (position p + 1); set by set_code_values.
            self.register_buffer("order", torch.arange(config.seq_len))
            # (D, K), in sequence order: the standardised value of each bin of the dimension at that slot.
            self.register_buffer("values", torch.zeros(config.seq_len, config.vocab_size))
            self.value_proj = nn.Linear(1, config.d_model, bias=False)
            self.value_head = nn.Linear(config.d_model, 2)  # (a, b) of the logits' a v + b v^2
            if config.value_shift:
                # Zero at the start: the shift is learned, not assumed.
                self.value_shift = nn.Parameter(torch.zeros(config.seq_len, self.num_condition_features))
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        if config.code_values and config.value_shift:
            nn.init.zeros_(self.value_shift)
        # GPT-2: scale the residual projections by depth so the residual stream keeps its size.
        for name, param in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * config.n_layers))

    @property
    def num_condition_features(self) -> int:
        """One-hot class (zeros: unconditional), then with ``kinematic`` the standardised log pT and
        log(1 + mass) (zero where not given)."""
        return self.config.num_classes + (len(KINEMATICS) if self.config.kinematic else 0)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_code_values(self, centers: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The reading order and value table from the bin centers (D, K) and the per-dimension mean
        and std (D,) of the training latents: widest dimension first, values standardised."""
        if not self.config.code_values:
            raise InvalidArgument("this GPT was built without code_values")
        if centers.shape != self.values.shape or mean.shape != (len(centers),) or std.shape != (len(centers),):
            raise InvalidArgument(f"centers {tuple(centers.shape)}, mean {tuple(mean.shape)} and std "
                                  f"{tuple(std.shape)} do not match (seq_len, vocab) {tuple(self.values.shape)}")
        order = torch.sort(std, descending=True, stable=True).indices
        # A dimension whose training latents never vary is scaled by the spread of its bins instead:
        # dividing by ~0 would make the values of its other bins, and their logits, infinite.
        scale = torch.where(std > 0, std, centers.std(dim=1)).clamp_min(1e-12)
        with torch.no_grad():
            self.order.copy_(order)
            self.values.copy_(((centers - mean[:, None]) / scale[:, None])[order])

    def set_kinematics(self, pt: torch.Tensor, mass: torch.Tensor) -> None:
        """The standardisation and range of the conditioning values from the training jets' pT and mass (GeV)."""
        if not self.config.kinematic:
            raise InvalidArgument("this GPT was built without kinematic conditioning")
        values = torch.stack([torch.as_tensor(pt, dtype=torch.float64), torch.as_tensor(mass, dtype=torch.float64)], 1)
        if values.ndim != 2 or len(values) < 2 or not torch.isfinite(values).all() or (values[:, 0] <= 0).any() or (
                values[:, 1] < 0).any():
            raise InvalidArgument("set_kinematics: need at least two jets with finite pT > 0 and mass >= 0")
        features = kinematic_features(values)
        with torch.no_grad():
            self.kinematic_mean.copy_(features.mean(0))
            self.kinematic_std.copy_(features.std(0).clamp_min(1e-6))
            self.kinematic_range.copy_(torch.stack([values.min(0).values, values.max(0).values], 1))

    def condition(self, first: torch.Tensor, kinematics: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The condition of each sequence from its start token ``first`` (B, 1) and, with ``kinematic``,
        its requested (pT, mass) (B, 2) in GeV, NaN where not given: the vector (B, 1, C) added to
        every position, and the features (B, F) of :attr:`num_condition_features`."""
        label = first[:, 0] - self.config.vocab_size
        # A sequence that does not open with a start token is read as unconditional.
        label = torch.where(label >= 0, label, self.config.num_classes)
        vector = self.class_emb(label).unsqueeze(1)
        features = F.one_hot(label, self.config.num_classes + 1)[:, : self.config.num_classes].float()
        if not self.config.kinematic:
            if kinematics is not None:
                raise InvalidArgument("this Transformer was trained without pT/mass conditioning: retrain it on "
                                      "codes that carry pt and m0 (jetfast encode of a file that has them)")
            return vector, features
        if kinematics is None:
            kinematics = torch.full((len(first), len(KINEMATICS)), math.nan, device=first.device)
        given = torch.isfinite(kinematics)
        u = torch.where(given, (kinematic_features(kinematics.float()) - self.kinematic_mean) / self.kinematic_std, 0.0)
        inputs = torch.cat([u, given.float()], dim=1).to(vector.dtype)
        return vector + self.kinematic_emb(inputs).unsqueeze(1), torch.cat([features, u], dim=1)

    def to_sequence(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, D) in latent order -> the order the model reads them in."""
        return codes[:, self.order] if self.config.code_values else codes

    def to_latent(self, sequence: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_sequence`."""
        if not self.config.code_values:
            return sequence
        codes = torch.empty_like(sequence)
        codes[:, self.order] = sequence
        return codes

    def class_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        """Start-token ids for class labels (B,); a label of -1 means unconditional."""
        return torch.where(labels < 0, self.config.unconditional_token, self.config.vocab_size + labels)

    def forward(self, idx: torch.Tensor, pos: int | None = None, kinematics: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T).

        ``pos=None``: a full causal pass (training, reference). ``pos=p``: the tokens
        sit at positions [p, p+T) and their keys/values go into the caches set up by
        :meth:`setup_caches` (T > 1 only as a prefill from p = 0). ``kinematics`` (B, 2): the
        jets' requested (pT, mass) in GeV, NaN where not given (read with position 0 only).
        """
        _, length = idx.shape
        start = 0 if pos is None else pos
        if start + length > self.config.seq_len:
            raise ValueError(f"GPT: positions up to {start + length} exceed seq_len={self.config.seq_len}")
        if pos is not None and self.blocks[0].attn.kv_cache is None:
            raise RuntimeError("GPT: call model.setup_caches(batch) before cached decoding")
        x = self.tok_emb(idx) + self.pos_emb[start : start + length]  # (B, T, C)
        if start == 0:
            vectors, features = self.condition(idx[:, :1], kinematics)
            if pos is not None:
                self.condition_cache = vectors, features
        elif self.condition_cache is None or self.condition_cache[0].shape[0] != idx.shape[0]:
            raise RuntimeError("GPT: a cached decode starts with prefill(), which sets the class of every row")
        else:
            vectors, features = self.condition_cache
        x = x + vectors
        if self.config.code_values:
            # The token at position p >= 1 is the code of sequence slot p - 1; position 0 is the start token.
            positions = torch.arange(start, start + length, device=idx.device)
            dims = (positions - 1).clamp_min(0).expand_as(idx)
            values = self.values[dims, idx.clamp_max(self.config.vocab_size - 1)]  # (B, T)
            values = torch.where(positions >= 1, values, 0.0)
            x = x + self.value_proj(values.unsqueeze(-1).to(x.dtype))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, pos)
        x = self.ln_f(x)
        weight = self.tok_emb.weight[: self.config.vocab_size] if self.head is None else self.head.weight
        logits = linear(x, weight)  # (B, T, vocab)
        if self.config.code_values:
            # Position p predicts the code of slot p: its bin values (T, vocab).
            predicted = self.values[start : start + length]
            a, b = self.value_head(x).unsqueeze(-1).unbind(-2)  # (B, T, 1) each
            if self.config.value_shift:
                a = a + (features @ self.value_shift[start : start + length].T).unsqueeze(-1).to(a.dtype)
            logits = logits + a * predicted + b * predicted.square()
        return logits

    def decode_weights(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
        """Per block, the GEMM operands of a cached decode step in ``dtype`` (see :meth:`Block.decode_step`).

        In the parameters' dtype these are the parameters; in another (bf16) they are copies, kept
        until a parameter changes (its version counter moves, as an optimizer step makes it), so
        sampling during training never reads stale weights."""
        blocks = [(b.attn.qkv.weight, b.attn.qkv.bias, b.attn.proj.weight, b.attn.proj.bias, b.mlp.fc.weight,
                   b.mlp.fc.bias, b.mlp.proj.weight, b.mlp.proj.bias) for b in self.blocks]
        if blocks[0][0].dtype == dtype:
            return blocks
        params = [p for weights in blocks for p in weights]
        key = (dtype, params[0].device, _versions(params))
        if self._decode_weights is None or self._decode_weights[0] != key:
            with torch.no_grad():
                copies = [tuple(p.detach().to(dtype) for p in weights) for weights in blocks]
            self._decode_weights = key, copies
        return self._decode_weights[1]

    def packed_weights(self, rows: int, blocks: bool = True) -> tuple[list[tuple[Packed, ...]] | None, Packed] | None:
        """MKL packings (:func:`jetfast.kernels.linear.pack`) of the fp32 GEMM weights of a cached decode
        of ``rows`` sequences: per block (qkv, attention projection, MLP in, MLP out), or None without
        ``blocks`` (the compiled blocks pack their own), and the output head's. A batch of ~100
        otherwise pays oneDNN's reordering of every weight at every GEMM of every step. Kept until a
        parameter changes or another row count is asked for; None where packing does not serve (no
        MKL, not fp32 on the CPU, autograd on)."""
        matrices = [(b.attn.qkv.weight, b.attn.proj.weight, b.mlp.fc.weight, b.mlp.proj.weight) for b in self.blocks]
        head = self.tok_emb.weight[: self.config.vocab_size] if self.head is None else self.head.weight
        watched = [p for weights in matrices for p in weights] if blocks else []
        key = (rows, blocks, _versions(watched + [head]))  # (a tied head: tok_emb's version)
        if self._packed_weights is None or self._packed_weights[0] != key:
            self._packed_weights = None  # (the old packings go before the new ones are made)
            head_packed = pack(head, rows)
            if head_packed is None:
                return None
            blocks_packed = [tuple(pack(w, rows) for w in weights) for weights in matrices] if blocks else None
            self._packed_weights = key, (blocks_packed, head_packed)
        return self._packed_weights[1]

    def decode_step(self, token: torch.Tensor, pos: int, kinematics: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, vocab), fp32, of the code that follows token (B,) at position ``pos``.

        The cached path of :meth:`forward` for one token per sequence, as one function: no module
        calls, no shape bookkeeping for a length that is always 1 (the per-step cost at small batches
        is mostly such overhead, not arithmetic). ``pos=0`` is the prefill: the token is a start token
        and sets the condition of the rows (with ``kinematics``). The caches' dtype sets the GEMMs'
        precision: in bf16 the layer inputs are cast to bf16 before each GEMM and the KV cache is bf16,
        while layer norms, the residual stream, the softmax (inside the attention) and the output head
        stay fp32 (the compiled CPU step of small batches, :meth:`fused_blocks`, keeps the layer inputs
        fp32 as well and widens the bf16 weights). On the CPU the blocks are that compiled step
        wherever it serves, and fp32 GEMMs of larger batches read weights packed for the batch at
        the prefill (:meth:`packed_weights`). In fp32 the result is :meth:`forward`'s.
        """
        config = self.config
        caches = self.blocks[0].attn.kv_cache
        if caches is None:
            raise RuntimeError("GPT: call model.setup_caches(batch) before cached decoding")
        if not 0 <= pos < caches.k_cache.shape[2]:
            raise ValueError(f"GPT: position {pos} is outside the cache of {caches.k_cache.shape[2]} positions")
        if pos == 0:
            self.condition_cache = self.condition(token.view(-1, 1), kinematics)
        elif self.condition_cache is None or self.condition_cache[0].shape[0] != token.shape[0]:
            raise RuntimeError("GPT: a cached decode starts with prefill(), which sets the class of every row")
        if self._sequence_terms is None or self._sequence_terms[0] is not self.condition_cache:
            # (forward's cached path may have made the condition of these sequences)
            self._sequence_terms = self.condition_cache, self._decode_terms()
        class_vector, value_column, value_table, value_shifts = self._sequence_terms[1]
        x = F.embedding(token, self.tok_emb.weight).add_(self.pos_emb[pos]).add_(class_vector)  # (B, C)
        if config.code_values and pos >= 1:
            # The token at position pos is the code of sequence slot pos - 1: its value times value_proj.
            values = self.values[pos - 1, token.clamp_max(config.vocab_size - 1)]  # (B,)
            x = torch.addr(x, values.to(x.dtype), value_column)
        if pos == 0:
            # The blocks of this sequence, chosen at its prefill: the checks of fused_blocks cost
            # ~0.3 ms, a fifth of a batch-1 step, and nothing they look at changes within a
            # sequence (setup_caches drops the choice).
            self._sequence_blocks = fused = self.fused_blocks(x)
            # The output head is fp32 in every precision: packed from GEMM sizes on (the PyTorch blocks'
            # GEMMs too in fp32). packed_weights answers None off the CPU.
            if fused is None:
                packed = caches.k_cache.dtype == torch.float32
            else:
                packed = x.shape[0] >= MATVEC_MAX_ROWS
            self._sequence_packed = self.packed_weights(x.shape[0], blocks=fused is None) if packed else None
        fused, packed = self._sequence_blocks, self._sequence_packed
        if fused is not None:
            x = x.contiguous()  # a new tensor of this step: updated in place
            fused.step(x.numpy(), pos, torch.get_num_threads())
        else:
            blocks_packed = packed[0] if packed is not None else [None] * len(self.blocks)
            for block, weights, block_packed in zip(self.blocks, self.decode_weights(caches.k_cache.dtype), blocks_packed):
                x = block.decode_step(x, pos, weights, block_packed)
        x = F.layer_norm(x, (config.d_model,), self.ln_f.weight, self.ln_f.bias, self.ln_f.eps)
        weight = self.tok_emb.weight[: config.vocab_size] if self.head is None else self.head.weight
        logits = linear(x, weight, packed=None if packed is None else packed[1])  # (B, vocab)
        if config.code_values:
            # forward's a v + b v^2 over the bin values v of the slot this position predicts, as one
            # product of (a, b) (B, 2) with (v, v^2) (2, vocab): the step's small ops are its cost.
            ab = linear(x, self.value_head.weight, self.value_head.bias)  # (B, 2)
            if value_shifts is not None:
                ab[:, 0] += value_shifts[:, pos]
            logits = torch.addmm(logits, ab, value_table[pos])
        return logits

    def _decode_terms(self) -> tuple:
        """What every step of a cached decode adds that is fixed for its sequences, made at the
        prefill: the condition's vector (B, C), value_proj's column (C,), the bin values and their
        squares (S, 2, vocab), and each sequence's shift of ``a`` by its condition (B, S) or None."""
        vectors, features = self.condition_cache
        if not self.config.code_values:
            return vectors[:, 0], None, None, None
        table = torch.stack([self.values, self.values.square()], dim=1)
        shifts = (features @ self.value_shift.T).float() if self.config.value_shift else None
        return vectors[:, 0], self.value_proj.weight[:, 0], table, shifts

    def fused_blocks(self, x: torch.Tensor):
        """The blocks of a cached decode step as one compiled call (``jetfast._C.DecodeBlocks``, which
        computes what :meth:`Block.decode_step` does) where it serves: the residual stream ``x`` (B, C)
        fp32 on the CPU, autograd off, fp32 parameters, and fp32 caches, or bf16 caches on a CPU with
        AVX2 (then the GEMM weights are :meth:`decode_weights`' bf16 copies); else None. Below
        :data:`MATVEC_MAX_ROWS` rows its products are matrix-vector rows, which widen bf16 weights to
        fp32 and keep the layer inputs fp32. From there on they are MKL's GEMMs, where PyTorch carries
        MKL: in fp32 on weights packed for B rows, in bf16 (on CPUs where PyTorch runs bf16 GEMMs
        natively) on bf16 layer inputs, as the PyTorch blocks compute.

        It reads the caches in place, and the parameters too unless packed (NumPy views), so it is
        made again when a cache, a parameter or a bf16 copy is replaced, and when packed also when a
        parameter changes in place. :meth:`decode_step` calls it once per sequence, at the prefill
        (its checks cost ~0.3 ms, a packing several)."""
        caches = tuple(block.attn.kv_cache for block in self.blocks)
        if not (HAS_NATIVE and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
                and caches[0] is not None):
            return None
        dtype = caches[0].k_cache.dtype
        if not (dtype == torch.float32 or (dtype == torch.bfloat16 and _C.decode_blocks_bf16)):
            return None
        gemm = x.shape[0] >= MATVEC_MAX_ROWS
        if gemm and not (mkl_gemm() if dtype == torch.float32 else mkl_bf16_gemm()):
            return None
        packed = gemm and dtype == torch.float32
        if self.blocks[0].attn.qkv.weight.dtype != torch.float32:
            return None  # e.g. a model cast to bf16: the PyTorch blocks serve it
        matrices = [w[i] for w in self.decode_weights(dtype) for i in (0, 2, 4, 6)]  # the parameters in fp32
        if self._fused_blocks is not None:
            made_for, params, key, fused = self._fused_blocks
            if made_for == caches and key == self._fused_key(params, packed):
                return fused
        self._fused_blocks = None
        if not all(c is not None and c.k_cache.dtype == dtype for c in caches):
            return None
        params, tensors = [], []
        for layer, (block, cache) in enumerate(zip(self.blocks, caches)):
            attn, mlp = block.attn, block.mlp
            qkv, proj, fc, out = matrices[4 * layer : 4 * layer + 4]
            weights = [block.ln_1.weight, block.ln_1.bias, qkv, attn.qkv.bias, proj, attn.proj.bias, block.ln_2.weight,
                       block.ln_2.bias, fc, mlp.fc.bias, out, mlp.proj.bias]
            params += weights
            # the caches' storage, positions outermost (KVCache)
            tensors.append(weights + [cache.k_cache.permute(2, 0, 1, 3), cache.v_cache.permute(2, 0, 1, 3)])
        if not all(t is not None and t.dtype in (torch.float32, dtype) and t.is_contiguous() for ts in tensors for t in ts):
            return None
        eps = [(float(b.ln_1.eps), float(b.ln_2.eps)) for b in self.blocks]
        # NumPy has no bf16: such tensors go as their bits
        arrays = [[(t.detach().view(torch.int16) if t.dtype == torch.bfloat16 else t.detach()).numpy() for t in ts]
                  for ts in tensors]
        fused = _C.DecodeBlocks(arrays, eps, self.config.n_heads, bf16=dtype == torch.bfloat16, gemm=gemm)
        self._fused_blocks = caches, params, self._fused_key(params, packed), fused
        return fused

    @staticmethod
    def _fused_key(params: list, packed: bool) -> tuple:
        # Packed weights are copies, so an in-place change (an optimizer step) must be seen too.
        return packed, _versions(params) if packed else tuple(p.data_ptr() for p in params)

    def setup_caches(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Preallocate a KV cache of (batch, heads, max_len, head_dim) in every layer."""
        max_len = self.config.seq_len if max_len is None else max_len
        if not 1 <= max_len <= self.config.seq_len:
            raise ValueError(f"setup_caches: need 1 <= max_len <= seq_len={self.config.seq_len}; got {max_len}")
        reference = self.pos_emb
        dtype = reference.dtype if dtype is None else dtype
        self._sequence_blocks = self._sequence_packed = None
        for block in self.blocks:
            cache = block.attn.kv_cache
            shape = (batch, self.config.n_heads, max_len, self.config.head_dim)
            # A cache made under inference mode (kept by the sampler) cannot be written outside it.
            if cache is None or cache.k_cache.shape != shape or cache.k_cache.dtype != dtype or (
                cache.k_cache.device != reference.device
            ) or (cache.k_cache.is_inference() and not torch.is_inference_mode_enabled()):
                self._fused_blocks = None  # it holds the old caches: let them go before the new ones come
                block.attn.kv_cache = KVCache(batch, self.config.n_heads, max_len, self.config.head_dim, dtype,
                                              reference.device)

    def clear_caches(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None
        self.condition_cache = None
        self._fused_blocks = self._sequence_blocks = None
        self._packed_weights = self._sequence_packed = None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------------------
# Cached generation, gpt-fast style: tiny functions with static shapes.
# --------------------------------------------------------------------------------------
def prefill(model: GPT, class_tokens: torch.Tensor, kinematics: torch.Tensor | None = None) -> torch.Tensor:
    """Run the start tokens (B,) at position 0 (with the requested (pT, mass) (B, 2) of a
    ``kinematic`` model); return logits (B, vocab) for c_0."""
    return model.decode_step(class_tokens.reshape(-1), 0, kinematics)


def decode_one_token(model: GPT, token: torch.Tensor, pos: int) -> torch.Tensor:
    """Feed code ``token`` (B,) at position ``pos``; return logits (B, vocab) for the next code."""
    return model.decode_step(token.reshape(-1), pos)


def decode_n_tokens(model: GPT, logits: torch.Tensor, codes: torch.Tensor, pick, start: int = 0) -> torch.Tensor:
    """Fill ``codes`` (B, D) from column ``start`` on.

    ``logits`` (B, vocab) predict column ``start``; ``pick(logits, column) -> (B,)``
    chooses each code (argmax or a draw). Returns ``codes``.
    """
    total = codes.shape[1]
    for column in range(start, total):
        token = pick(logits, column)
        codes[:, column] = token
        if column + 1 < total:
            # Code `column` sits at sequence position column + 1 (position 0 is the class token).
            logits = decode_one_token(model, token, column + 1)
    return codes


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------
def load_gpt(gpt_dir_or_ckpt, which: str = "best", map_location="cpu") -> tuple[GPT, GPTConfig]:
    """Load a trained code Transformer.

    Args:
        gpt_dir_or_ckpt: a ``train-gpt`` run directory (reads ``checkpoints/{which}.pt``)
            or a checkpoint file.
        which: "best" (lowest validation loss) or "last".

    Returns:
        ``(model.eval(), config)``.
    """
    path = checkpoint_file(gpt_dir_or_ckpt, which, command="train-gpt")
    # Training checkpoints also hold optimizer and RNG state (plain Python objects).
    payload = load_checkpoint(path, map_location=map_location)
    if not isinstance(payload, dict) or "config" not in payload or "model" not in payload:
        raise RunDirError(f"load_gpt: {path} is not a jetfast GPT checkpoint (no 'config'/'model')")
    config = GPTConfig.from_dict(payload["config"])
    model = GPT(config)
    model.load_state_dict(payload["model"])
    return model.eval(), config
