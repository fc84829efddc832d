"""Linear probe: multinomial logistic regression on frozen, standardised features.

Full-batch L-BFGS in float64 from a zero initialisation on CPU: the same features give the same
classifier every time (no minibatch order, no random init), which is what a cheap comparison of two
checkpoints needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, weight_decay: float = 1e-3, max_iter: int = 300) -> dict[str, float]:
    """Fit a linear classifier on the train features and report top-1 accuracy.

    Args:
        train_feats: (N, D) features; standardised with their own per-dimension mean/std, which are then
            applied to the test features.
        train_labels: (N,) labels in [0, K); K = max label + 1.
        test_feats: (M, D) features.
        test_labels: (M,) labels; a class never seen in training counts as an error.
        weight_decay: L2 penalty ``weight_decay / 2 * ||W||^2`` on the weights (not the bias), added to
            the mean cross-entropy.
        max_iter: L-BFGS iterations.

    Returns:
        ``{"top1": test accuracy, "train_top1": train accuracy, "train_loss": final objective}``.
    """
    x = train_feats.detach().double().cpu()
    y = train_labels.long().cpu()
    if x.shape[0] == 0:
        raise ValueError("linear probe needs training features")
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    x = (x - mean) / std
    xt = (test_feats.detach().double().cpu() - mean) / std
    k = int(y.max()) + 1
    w = torch.zeros(x.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-10,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * w.square().sum()
        loss.backward()
        return loss

    opt.step(objective)
    with torch.no_grad():
        final = float(F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * w.square().sum())
        train_acc = float(((x @ w + b).argmax(1) == y).double().mean())
        test_acc = float(((xt @ w + b).argmax(1) == test_labels.long().cpu()).double().mean())
    return {"top1": test_acc, "train_top1": train_acc, "train_loss": final}
