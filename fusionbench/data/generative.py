"""The generative model of Pro-Fusion's appendix (eqs. 1-5, Figures 7-8): regression where
modality 1 is corrupted by a function of the latent that modality 2 observes.

    Z ~ U[-2.5, 2.5]^d                                     (1)
    W_1, W_2, W_y ~ N(0, I)                                (2)
    X_1 = lReLU(W_1 Z) - 2 |eta| sin(W_2 Z) + eps_1        (3)
    X_2 = sin(W_2 Z) + sigma_2 eps_2                       (4)
    Y   = W_y Z + eps_y                                    (5)

with standard normal eps. eta sets how strongly X_1 is corrupted by the quantity X_2 measures, so
undoing the corruption needs X_2's information *inside* X_1's encoder: the case backward connections
are for. The paper does not give d, the widths of X_1, X_2, Y, the lReLU slope or the sample counts;
the defaults below are ours (stated in the study's table caption).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from fusionbench.data.base import FusionDataModule, TensorDictDataset
from fusionbench.errors import DatasetError


class GenerativeDataModule(FusionDataModule):
    """Args:
    latent_dim: d, width of Z.
    x_dims: ``{"x1": n, "x2": n}`` widths of the modalities (rows of W_1 and W_2; equal, as eq. 3 needs).
    y_dim: width of Y (rows of W_y).
    eta: corruption strength of X_1 (eq. 3).
    sigma2: noise level of X_2 (eq. 4).
    noise_y: standard deviation of eps_y (eq. 5 uses 1).
    slope: negative slope of the leaky ReLU.
    num_samples: ``{"train": n, "val": n, "test": n}``.
    seed: draws W_1, W_2, W_y and the samples; base and Pro-Fusion runs of a trial share it.
    modalities: optional subset of ``[x1, x2]``.
    """

    def __init__(
        self,
        latent_dim: int = 8,
        x_dims: Mapping[str, int] | None = None,
        y_dim: int = 1,
        eta: float = 1.0,
        sigma2: float = 0.5,
        noise_y: float = 1.0,
        slope: float = 0.01,
        num_samples: Mapping[str, int] | None = None,
        seed: int = 0,
        modalities: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("name", "generative")
        kwargs.setdefault("data_dir", ".")
        kwargs.setdefault("monitor", {"metric": "val/loss", "mode": "min"})
        super().__init__(**kwargs)
        self.task_type, self.num_outputs = "regression", int(y_dim)
        self.x_dims = dict(x_dims or {"x1": 16, "x2": 16})
        if self.x_dims.get("x1") != self.x_dims.get("x2"):
            raise DatasetError(
                "x_dims must give x1 and x2 the same width (eq. 3 subtracts sin(W_2 Z) from X_1), "
                f"got {self.x_dims}."
            )
        self.modalities = self.select_modalities(["x1", "x2"], modalities)
        self.input_dims = {m: int(self.x_dims[m]) for m in self.modalities}
        self.latent_dim, self.eta, self.sigma2 = int(latent_dim), float(eta), float(sigma2)
        self.noise_y, self.slope = float(noise_y), float(slope)
        self.num_samples = dict(num_samples or {"train": 4000, "val": 1000, "test": 2000})
        self.seed = seed

    def prepare_data(self) -> None:
        self.data_checksum = f"generative-eta{self.eta}-sigma{self.sigma2}-seed{self.seed}"

    def weights(self, g: torch.Generator) -> dict[str, torch.Tensor]:
        d = self.latent_dim
        return {
            "w1": torch.randn(self.x_dims["x1"], d, generator=g),
            "w2": torch.randn(self.x_dims["x2"], d, generator=g),
            "wy": torch.randn(self.num_outputs, d, generator=g),
        }

    def sample(self, n: int, w: dict[str, torch.Tensor], g: torch.Generator) -> TensorDictDataset:
        z = 5.0 * torch.rand(n, self.latent_dim, generator=g) - 2.5  # eq. 1
        s = torch.sin(z @ w["w2"].T)
        x1 = (
            F.leaky_relu(z @ w["w1"].T, self.slope)
            - 2 * abs(self.eta) * s
            + torch.randn(n, self.x_dims["x1"], generator=g)
        )
        x2 = s + self.sigma2 * torch.randn(n, self.x_dims["x2"], generator=g)
        y = z @ w["wy"].T + self.noise_y * torch.randn(n, self.num_outputs, generator=g)
        inputs = {"x1": x1, "x2": x2}
        return TensorDictDataset({m: inputs[m] for m in self.modalities}, y)

    def _load(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        w = self.weights(g)
        self.train_set, self.val_set, self.test_set = (
            self.sample(self.num_samples[s], w, g) for s in ("train", "val", "test")
        )
