"""The lattice task of Pro-Fusion's synthetic study (§4.1, Figure 4).

Modality ``function`` holds a smooth random function sampled on a lattice, x_d = f(d / D) for
d = 0..D-1 (a different function per sample, so it cannot be memorised); modality ``position``
holds a sinusoidal position embedding of one lattice point l; the label is the first non-zero digit
of x_l. Reading the answer needs the position to pick one of D values out of the function, which a
late-fusion model with a narrow per-modality layer cannot do: the value is lost before fusion.

Our instantiation (the paper gives no sizes): f(t) = 0.1 + 0.899 sigmoid(g(t)) with
g(t) = sum_k a_k sin(2 pi k t + phi_k) / sqrt(K), a_k ~ N(0, 1.5^2), phi_k ~ U[0, 2 pi), k = 1..K, so
f lies in [0.1, 1) and its first non-zero digit is floor(10 f) in 1..9 (classes 0..8).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fusionbench.data.base import FusionDataModule, TensorDictDataset


def position_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sin/cos embedding of integer positions (N,) -> (N, dim)."""
    half = dim // 2
    freq = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float64) / max(half, 1))
    angle = positions.double()[:, None] * freq[None]
    emb = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim - emb.shape[1])).float()


def first_nonzero_digit(x: torch.Tensor) -> torch.Tensor:
    """First significant decimal digit of positive values (1..9)."""
    exponent = torch.floor(torch.log10(x.double()))
    return torch.floor(x.double() / 10.0**exponent).long().clamp(1, 9)


class LatticeDataModule(FusionDataModule):
    """Args:
    lattice_size: D, the number of lattice points (width of the ``function`` modality).
    embedding_dim: width of the ``position`` modality.
    harmonics: K, sine components of the random function (its smoothness).
    num_samples: ``{"train": n, "val": n, "test": n}``.
    seed: data seed (a trial's base and Pro-Fusion runs share it).
    modalities: optional subset of ``[function, position]``.
    """

    def __init__(
        self,
        lattice_size: int = 32,
        embedding_dim: int = 16,
        harmonics: int = 4,
        num_samples: Mapping[str, int] | None = None,
        seed: int = 0,
        modalities: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("name", "lattice")
        kwargs.setdefault("data_dir", ".")
        super().__init__(**kwargs)
        self.task_type, self.num_outputs = "multiclass", 9
        self.modalities = self.select_modalities(["function", "position"], modalities)
        self.lattice_size, self.embedding_dim, self.harmonics = (
            int(lattice_size),
            int(embedding_dim),
            int(harmonics),
        )
        self.input_dims = {"function": self.lattice_size, "position": self.embedding_dim}
        self.input_dims = {m: self.input_dims[m] for m in self.modalities}
        self.num_samples = dict(num_samples or {"train": 10000, "val": 2000, "test": 2000})
        self.seed = seed

    def prepare_data(self) -> None:
        self.data_checksum = f"lattice-D{self.lattice_size}-seed{self.seed}"

    def sample(self, n: int, g: torch.Generator) -> TensorDictDataset:
        t = torch.arange(self.lattice_size, dtype=torch.float64) / self.lattice_size
        k = torch.arange(1, self.harmonics + 1, dtype=torch.float64)
        amp = 1.5 * torch.randn(n, self.harmonics, generator=g, dtype=torch.float64)
        phase = 2 * math.pi * torch.rand(n, self.harmonics, generator=g, dtype=torch.float64)
        g_t = (
            amp[:, :, None] * torch.sin(2 * math.pi * k[None, :, None] * t[None, None] + phase[:, :, None])
        ).sum(1)
        f = 0.1 + 0.899 * torch.sigmoid(g_t / math.sqrt(self.harmonics))
        pos = torch.randint(0, self.lattice_size, (n,), generator=g)
        label = first_nonzero_digit(f[torch.arange(n), pos]) - 1
        inputs = {"function": f.float(), "position": position_embedding(pos, self.embedding_dim)}
        return TensorDictDataset({m: inputs[m] for m in self.modalities}, label)

    def _load(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.train_set, self.val_set, self.test_set = (
            self.sample(self.num_samples[s], g) for s in ("train", "val", "test")
        )
