"""Nearest-neighbour video retrieval (docs/method.md, section 8): test clips query the train split.

Each set is centred by its own mean and L2-normalised; similarity is the dot product; Recall@k is the
fraction of queries with at least one of their k most similar gallery videos in the same class. The
top-1 confusion matrix says which classes a representation mixes up (R@1 is its trace over its sum).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KS = (1, 5, 10, 20, 50)


def _centre_normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    x = x - x.mean(dim=0, keepdim=True)
    # A row equal to the set mean has no direction; it stays zero (similarity 0 to everything).
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def retrieval_recall(query_feats: torch.Tensor, query_labels: torch.Tensor, gallery_feats: torch.Tensor,
                     gallery_labels: torch.Tensor, ks: Sequence[int] = KS,
                     chunk: int = 1024) -> dict[str, float]:
    """Recall@k of class-level retrieval.

    Args:
        query_feats: (Nq, D) features of the queries (test split).
        query_labels: (Nq,) integer labels.
        gallery_feats: (Ng, D) features of the gallery (train split).
        gallery_labels: (Ng,) integer labels.
        ks: cut-offs; a k larger than Ng is clipped to Ng (the key keeps the requested k).
        chunk: queries per similarity block (bounds memory at chunk x Ng).

    Returns:
        ``{"R@1": r1, "R@5": r5, ...}``: fractions in [0, 1].
    """
    if query_feats.shape[0] == 0 or gallery_feats.shape[0] == 0:
        raise ValueError("retrieval needs at least one query and one gallery item")
    if query_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(f"feature sizes differ: query {query_feats.shape[1]}, gallery {gallery_feats.shape[1]}")
    q, g = _centre_normalise(query_feats), _centre_normalise(gallery_feats)
    ql, gl = query_labels.long().cpu(), gallery_labels.long().cpu()
    kmax = min(max(ks), g.shape[0])
    hits = {k: 0 for k in ks}
    for s in range(0, q.shape[0], chunk):
        sim = q[s:s + chunk] @ g.T                                   # (n, Ng)
        top = sim.topk(kmax, dim=1).indices                          # (n, kmax), most similar first
        same = gl[top] == ql[s:s + chunk, None]                      # (n, kmax)
        # first_hit[i] = rank of the first same-class neighbour (kmax if none)
        first_hit = torch.where(same.any(1), same.float().argmax(1), torch.full_like(ql[s:s + chunk], kmax))
        for k in ks:
            hits[k] += int((first_hit < min(k, g.shape[0])).sum())
    return {f"R@{k}": hits[k] / q.shape[0] for k in ks}


@torch.no_grad()
def top1_confusion(query_feats: torch.Tensor, query_labels: torch.Tensor, gallery_feats: torch.Tensor,
                   gallery_labels: torch.Tensor, num_classes: int, chunk: int = 1024) -> torch.Tensor:
    """Which class each query's most similar gallery video belongs to.

    Args: as :func:`retrieval_recall`; labels in [0, num_classes).

    Returns:
        (num_classes, num_classes) int64 counts: row = the query's class, column = the class of its
        nearest gallery video (same similarity as :func:`retrieval_recall`, so the diagonal's sum over
        the total is R@1).
    """
    if query_feats.shape[0] == 0 or gallery_feats.shape[0] == 0:
        raise ValueError("retrieval needs at least one query and one gallery item")
    q, g = _centre_normalise(query_feats), _centre_normalise(gallery_feats)
    ql, gl = query_labels.long().cpu(), gallery_labels.long().cpu()
    if min(int(ql.min()), int(gl.min())) < 0 or max(int(ql.max()), int(gl.max())) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    counts = torch.zeros(num_classes * num_classes, dtype=torch.long)
    for s in range(0, q.shape[0], chunk):
        nearest = gl[(q[s:s + chunk] @ g.T).argmax(dim=1)]
        counts += torch.bincount(ql[s:s + chunk] * num_classes + nearest, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)
