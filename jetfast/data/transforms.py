"""Geometry and intensity transforms between file layout and model layout.

File layout: (N, 125, 125, 3) float32, channels last, physical units (GeV).
Model layout: (B, 3, 128, 128) float32, channels first, padded and transformed.

Padding 125 -> 128 adds one zero row/column before and two after, so it is
lossless and exactly undone by cropping (resizing would smear energy). The
intensity transform is, per channel c,

    t = (log1p(x / scale_c) - mean_c) / std_c

whose inverse ``x = scale_c * expm1(t * std_c + mean_c)`` is exact up to float
rounding. ``scale_c`` compresses the rare huge Tracks deposits (up to ~750 GeV)
into the same range as the soft pixels; ``mean_c``/``std_c`` standardise with
train-set statistics. Padding happens first, so padded pixels hold the
transformed value of zero energy. The transform is saved with every checkpoint
(:meth:`IntensityTransform.to_dict`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from jetfast.data.format import IMAGE_SIZE, MODEL_SIZE
from jetfast.errors import InvalidArgument

PAD_BEFORE = 1
PAD_AFTER = MODEL_SIZE - IMAGE_SIZE - PAD_BEFORE  # 2


def pad_to_model(images: torch.Tensor) -> torch.Tensor:
    """(B, 125, 125, 3) channels-last physical images -> (B, 3, 128, 128), zero padded."""
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected images of shape (B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3); got {tuple(images.shape)}")
    chw = images.permute(0, 3, 1, 2)
    return torch.nn.functional.pad(chw, (PAD_BEFORE, PAD_AFTER, PAD_BEFORE, PAD_AFTER))


def crop_to_image(tensors: torch.Tensor) -> torch.Tensor:
    """(B, 3, 128, 128) model layout -> (B, 125, 125, 3) channels last (inverse of pad_to_model)."""
    if tensors.ndim != 4 or tensors.shape[1:] != (3, MODEL_SIZE, MODEL_SIZE):
        raise ValueError(f"expected tensors of shape (B, 3, {MODEL_SIZE}, {MODEL_SIZE}); got {tuple(tensors.shape)}")
    end = PAD_BEFORE + IMAGE_SIZE
    return tensors[:, :, PAD_BEFORE:end, PAD_BEFORE:end].permute(0, 2, 3, 1)


@dataclass(frozen=True)
class IntensityTransform:
    """Per-channel ``(log1p(x / scale) - mean) / std``; see the module docstring."""

    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        for name in ("scale", "mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise ValueError(f"IntensityTransform.{name} must be 3 finite numbers; got {values}")
            object.__setattr__(self, name, values)
        if min(self.scale) <= 0 or min(self.std) <= 0:
            raise ValueError(f"IntensityTransform needs scale > 0 and std > 0; got scale={self.scale}, std={self.std}")

    # -- fitting ---------------------------------------------------------------------------
    @classmethod
    def fit(cls, images: np.ndarray) -> "IntensityTransform":
        """Fit on a sample of file-layout images (N, 125, 125, 3) in GeV.

        ``scale_c`` is the median non-zero pixel of the channel, so a typical lit pixel
        maps to log1p(1) and the tail is log-compressed; mean and std are taken over all
        pixels of the 128x128 padded image (zeros included), as the model sees them.
        """
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images of shape (N, H, W, 3); got {images.shape}")
        if not np.isfinite(images).all():
            raise InvalidArgument("images contain NaN or inf; cannot fit the intensity transform")
        scale, mean, std = [], [], []
        pad_fraction = 1.0 - (images.shape[1] * images.shape[2]) / float(MODEL_SIZE * MODEL_SIZE)
        for c in range(3):
            channel = images[..., c]
            lit = channel[channel > 0]
            s = float(np.median(lit)) if lit.size else 1.0
            t = np.log1p(channel / s, dtype=np.float64)
            # Padded pixels are zeros (t = 0): fold them into the moments analytically.
            m1 = t.mean() * (1 - pad_fraction)
            m2 = (t * t).mean() * (1 - pad_fraction)
            scale.append(s)
            mean.append(m1)
            std.append(max(math.sqrt(max(m2 - m1 * m1, 0.0)), 1e-6))
        return cls(tuple(scale), tuple(mean), tuple(std))

    # -- application -----------------------------------------------------------------------
    def _params(self, like: torch.Tensor):
        shape = (1, 3, 1, 1)
        to = dict(dtype=like.dtype, device=like.device)
        return (
            torch.tensor(self.scale, **to).view(shape),
            torch.tensor(self.mean, **to).view(shape),
            torch.tensor(self.std, **to).view(shape),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Physical (B, 3, H, W) -> model space."""
        scale, mean, std = self._params(x)
        return (torch.log1p(x / scale) - mean) / std

    def inverse(self, t: torch.Tensor) -> torch.Tensor:
        """Model space (B, 3, H, W) -> physical units, never negative."""
        scale, mean, std = self._params(t)
        return (scale * torch.expm1(t * std + mean)).clamp_min_(0.0)

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        """File layout (B, 125, 125, 3) physical -> model layout (B, 3, 128, 128) transformed."""
        return self.forward(pad_to_model(images))

    def to_images(self, tensors: torch.Tensor) -> torch.Tensor:
        """Model layout (B, 3, 128, 128) -> file layout (B, 125, 125, 3) in GeV."""
        return crop_to_image(self.inverse(tensors)).contiguous()

    # -- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"kind": "log1p_standardize", **{k: list(v) for k, v in asdict(self).items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "IntensityTransform":
        if d.get("kind", "log1p_standardize") != "log1p_standardize":
            raise ValueError(f"unknown intensity transform kind {d.get('kind')!r}")
        # Transforms saved by earlier versions also hold a "floor", no longer used.
        return cls(tuple(d["scale"]), tuple(d["mean"]), tuple(d["std"]))
