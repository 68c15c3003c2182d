"""What the role vectors say about the axis: PCA of the role space, and how many rollouts a vector needs.

- PCA over the role vectors at each layer: the paper finds that the top principal component of the
  role space lines up with the Assistant Axis. We report variance explained, the (sign-aligned)
  cosine between PC1 and the axis per layer, and per-role loadings vs axis projections.
- Stability: cosine between vectors built from disjoint random subsets of a role's qualifying
  replies, as the subset grows; the same for the axis built from two disjoint halves of the roles.
  Vectors are compared after subtracting the default vector, i.e. as the direction a role adds to the
  axis: raw residual means share a large common component that makes any two look alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PCAResult", "pca", "cosine", "split_cosines", "axis_split_cosines", "subset_sizes"]


@dataclass(frozen=True)
class PCAResult:
    components: torch.Tensor  # [k, hidden], PC1 sign-aligned with the axis
    variance_ratio: torch.Tensor  # [k]
    scores: torch.Tensor  # [n_roles, k] role loadings (centred role vectors on each component)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1))


def pca(vectors: torch.Tensor, axis: torch.Tensor | None = None) -> PCAResult:
    """PCA of [n_roles, hidden] role vectors (centred on their mean); PC1 flipped to agree with `axis`."""
    x = vectors.double()
    centred = x - x.mean(dim=0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    k = max(1, min(len(x) - 1, vh.shape[0]))  # n roles span at most n-1 directions once centred
    components, variance = vh[:k], s[:k] ** 2
    if axis is not None and float(components[0] @ axis.double()) < 0:
        components = components.clone()
        components[0] = -components[0]
    ratio = variance / (s**2).sum().clamp_min(1e-30)
    return PCAResult(components.float(), ratio.float(), (centred @ components.T).float())


def subset_sizes(n_available: int, sizes: Sequence[int]) -> list[int]:
    """The configured sizes that fit twice into `n_available`, plus the half split itself."""
    half = n_available // 2
    return sorted({s for s in sizes if s <= half} | ({half} if half >= 1 else set()))


def split_cosines(
    acts: torch.Tensor, reference: torch.Tensor, sizes: Sequence[int], repeats: int, generator: torch.Generator
) -> list[tuple[int, int, float, float]]:
    """(n, repeat, cosine, raw cosine) between means of two disjoint random n-subsets of `acts` [m, hidden].

    `cosine` compares `mean - reference` (the role's direction relative to the default), `raw` the means.
    """
    rows = []
    for n in subset_sizes(len(acts), sizes):
        for r in range(repeats):
            order = torch.randperm(len(acts), generator=generator)
            a, b = acts[order[:n]].mean(dim=0), acts[order[n : 2 * n]].mean(dim=0)
            rows.append((n, r, cosine(a - reference, b - reference), cosine(a, b)))
    return rows


def axis_split_cosines(
    default: torch.Tensor, roles: torch.Tensor, repeats: int, generator: torch.Generator
) -> torch.Tensor:
    """[repeats, n_layers] cosine between axes built from two disjoint random halves of the roles.

    `default`: [n_layers, hidden]; `roles`: [n_roles, n_layers, hidden].
    """
    half = len(roles) // 2
    out = torch.empty(repeats, roles.shape[1])
    for r in range(repeats):
        order = torch.randperm(len(roles), generator=generator)
        a = default - roles[order[:half]].mean(dim=0)
        b = default - roles[order[half : 2 * half]].mean(dim=0)
        out[r] = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).float()
    return out
