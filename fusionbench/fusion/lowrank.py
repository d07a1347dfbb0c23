"""Low-rank multimodal fusion (Liu et al., ACL 2018, LMF): tensor fusion with the weight tensor
factorised into rank-r modality factors, never forming the outer product:

    h = sum_{k=1..r} lambda_k * prod_i ([z_i; 1] W_i^(k)) + b,   W_i^(k) in R^{(d_i+1) x d_out}.

Every factor is a registered parameter. (MultiBench keeps its factors in a Python list created with
``nn.Parameter(...).to(device)``, so on GPU none of them is trained; a test guards against that.)
"""

from __future__ import annotations

import torch
from torch import nn

from fusionbench.fusion.base import EncoderFusion
from fusionbench.fusion.tensor import append_one


class LowRankTensorFusion(EncoderFusion):
    """Args:
    rank: number of rank-one terms r.
    output_dim: width d_out of the fused vector fed to the head.
    """

    def __init__(self, encoders, num_outputs: int, rank: int = 4, output_dim: int = 32, **head) -> None:
        super().__init__(encoders, num_outputs, **head)
        self.rank = rank
        # std 1/sqrt(d+1) keeps each factor's output at unit scale, so the product over modalities
        # neither vanishes nor explodes (Xavier on the 3-D factor shrinks it by ~N orders of magnitude).
        self.factors = nn.ParameterDict(
            {
                m: nn.Parameter(torch.randn(rank, d + 1, output_dim) / (d + 1) ** 0.5)
                for m, d in self.embed_dims.items()
            }
        )
        self.rank_weights = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, rank)))
        self.bias = nn.Parameter(torch.zeros(output_dim))
        self.fused_dim = output_dim
        self.build_head()

    def fuse(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        prod = None
        for m in self.modalities:
            f = torch.einsum("bd,rdo->rbo", append_one(embeddings[m]), self.factors[m])
            prod = f if prod is None else prod * f
        return torch.einsum("r,rbo->bo", self.rank_weights[0], prod) + self.bias
