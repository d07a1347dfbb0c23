"""Synthetic multimodal data with a learnable signal, for tests and smoke runs.

Each sample has a latent vector u (for classification, a class embedding plus noise); modality m sees
``reshape(A_m u) + noise`` with its own random projection A_m, so every modality carries part of
the signal and fusing them helps. Nothing is read from disk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fusionbench.data.base import TASK_TYPES, FusionDataModule, TensorDictDataset
from fusionbench.errors import DatasetError


class SyntheticDataModule(FusionDataModule):
    """Args:
    shapes: modality -> per-sample shape (an int or a list, e.g. ``{"image": [1, 8, 8], "text": 16}``).
    task_type: ``multiclass``, ``multilabel`` or ``regression``.
    num_outputs: classes, labels or regression targets.
    num_samples: ``{"train": n, "val": n, "test": n}``.
    latent_dim: width of the shared latent.
    noise: standard deviation of the per-modality noise (higher = harder).
    seed: data seed (independent of the training seed).
    modalities: optional subset of ``shapes`` to use.
    **kwargs: `FusionDataModule` arguments (``name`` defaults to ``synthetic``).
    """

    def __init__(
        self,
        shapes: Mapping[str, int | Sequence[int]],
        task_type: str = "multiclass",
        num_outputs: int = 3,
        num_samples: Mapping[str, int] | None = None,
        latent_dim: int = 8,
        noise: float = 0.5,
        seed: int = 0,
        modalities: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("name", "synthetic")
        kwargs.setdefault("data_dir", ".")
        super().__init__(**kwargs)
        if task_type not in TASK_TYPES:
            raise DatasetError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}.")
        self.task_type = task_type
        self.num_outputs = int(num_outputs)
        self.shapes = {m: [s] if isinstance(s, int) else list(s) for m, s in shapes.items()}
        self.modalities = self.select_modalities(sorted(self.shapes), modalities)
        self.input_dims = {m: math.prod(self.shapes[m]) for m in self.modalities}
        self.num_samples = dict(num_samples or {"train": 256, "val": 64, "test": 64})
        self.latent_dim = latent_dim
        self.noise = noise
        self.seed = seed

    def prepare_data(self) -> None:
        self.data_checksum = f"synthetic-seed{self.seed}"

    def _make(self, n: int, g: torch.Generator, params: dict) -> TensorDictDataset:
        if self.task_type == "multiclass":
            y = torch.randint(0, self.num_outputs, (n,), generator=g)
            u = params["class_emb"][y] + 0.3 * torch.randn(n, self.latent_dim, generator=g)
        else:
            u = torch.randn(n, self.latent_dim, generator=g)
            scores = u @ params["readout"]
            y = (scores > 0).float() if self.task_type == "multilabel" else scores
        inputs = {}
        for m in self.modalities:
            x = u @ params["proj"][m] + self.noise * torch.randn(n, self.input_dims[m], generator=g)
            inputs[m] = x.reshape(n, *self.shapes[m])
        return TensorDictDataset(inputs, y)

    def _load(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        params = {
            "class_emb": 2.0 * torch.randn(self.num_outputs, self.latent_dim, generator=g),
            "readout": torch.randn(self.latent_dim, self.num_outputs, generator=g)
            / math.sqrt(self.latent_dim),
            # drawn for every modality, so a subset sees the same data as the full set
            "proj": {
                m: torch.randn(self.latent_dim, math.prod(self.shapes[m]), generator=g)
                / math.sqrt(self.latent_dim)
                for m in sorted(self.shapes)
            },
        }
        self.train_set = self._make(self.num_samples["train"], g, params)
        self.val_set = self._make(self.num_samples["val"], g, params)
        self.test_set = self._make(self.num_samples["test"], g, params)
