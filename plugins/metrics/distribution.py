"""Scoring metrics from next-token logits z, with lse = logsumexp(z) and p the dense distribution:

    loss     = lse - z[label]                                   (cross-entropy on the text)
    KL(p||q) = sum p log p - p.z + lse                           (no log_softmax of q needed)
    JS(p,q)  = H(m) - H(p)/2 - H(q)/2, m = (p + q) / 2, H the entropy
"""

from __future__ import annotations

import torch

from subfit_core.engine.interfaces import Metric


class Loss(Metric):
    description = "next-token cross-entropy on the scoring text"
    needs_reference = False

    def total(self, logits, lse, labels, reference):
        return lse.sum() - logits.gather(-1, labels[..., None]).sum()


class KLDivergence(Metric):
    description = "KL(dense || candidate) of the next-token distributions"

    def total(self, logits, lse, labels, reference):
        p, neg_entropy = reference
        return neg_entropy.sum() + lse.sum() - torch.dot(p.reshape(-1), logits.reshape(-1))


class JSDivergence(Metric):
    description = "Jensen-Shannon divergence of the dense and candidate next-token distributions"

    def total(self, logits, lse, labels, reference):
        p, neg_entropy = reference
        q = torch.softmax(logits, dim=-1)
        m = (p + q) / 2
        return 0.5 * neg_entropy.sum() + 0.5 * torch.xlogy(q, q).sum() - torch.xlogy(m, m).sum()
