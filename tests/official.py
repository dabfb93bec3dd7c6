"""Straightforward restatements of the official losses' semantics, written from their behaviour.

Each builds the full logit matrix the way the official code does (row max shift, masks, the small
epsilons inside the logs), so the presets can be checked against what users run today.
"""

import torch
import torch.nn.functional as F


def supcon(features, labels=None, mask=None, temperature=0.07, contrast_mode="all", base_temperature=0.07):
    """HobbitLong/SupContrast losses.py, current version (anchors without positives give 0)."""
    bsz, n_views = features.shape[:2]
    features = features.reshape(bsz, n_views, -1)
    if mask is None:
        labels = torch.arange(bsz) if labels is None else labels
        mask = (labels[:, None] == labels[None, :]).to(features.dtype)
    else:
        mask = mask.to(features.dtype)
    contrast = torch.cat(torch.unbind(features, 1), 0)
    anchor, n_anchor_views = (features[:, 0], 1) if contrast_mode == "one" else (contrast, n_views)
    logits = anchor @ contrast.T / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()
    mask = mask.repeat(n_anchor_views, n_views)
    not_self = torch.ones_like(mask)
    not_self[torch.arange(mask.shape[0]), torch.arange(mask.shape[0])] = 0
    mask = mask * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True) + 1e-9)
    n_pos = mask.sum(1)
    n_pos = torch.where(n_pos < 1e-6, torch.ones_like(n_pos), n_pos)
    mean_log_prob_pos = (mask * log_prob).sum(1) / n_pos
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


def paco(
    features,
    labels,
    sup_logits,
    *,
    alpha,
    beta=1.0,
    gamma=1.0,
    supt=1.0,
    temperature=1.0,
    base_temperature=None,
    K=128,
    num_classes=1000,
    weight=None,
    smooth=0.0,
    queries_only=True,
):
    """PaCo/LT losses.py (queries_only=True: anchors = (rows - K) // 2) and GPaCo/LT (False: rows - K).

    weight: [1, C] class frequencies (cal_weight_for_classes) or None.
    """
    base_temperature = temperature if base_temperature is None else base_temperature
    n_in = features.shape[0] - K
    b = n_in // 2 if queries_only else n_in
    labels = labels.reshape(-1, 1)
    mask = (labels[:b] == labels.T).to(features.dtype)
    sample_logits = features[:b] @ features.T / temperature
    centre = sup_logits if weight is None else sup_logits + torch.log(weight + 1e-9)
    logits = torch.cat([centre / supt, sample_logits], 1)
    logits = logits - logits.max(1, keepdim=True).values.detach()
    not_self = torch.ones_like(mask)
    not_self[torch.arange(b), torch.arange(b)] = 0
    mask = mask * not_self
    one_hot = F.one_hot(labels[:b].reshape(-1), num_classes).to(features.dtype)
    one_hot = smooth / (num_classes - 1) * (1 - one_hot) + (1 - smooth) * one_hot
    target = torch.cat([one_hot * beta, mask * alpha], 1)
    denom_w = torch.cat([torch.ones(b, num_classes, dtype=features.dtype), gamma * not_self], 1)
    log_prob = logits - torch.log((torch.exp(logits) * denom_w).sum(1, keepdim=True) + 1e-12)
    mean_log_prob_pos = (target * log_prob).sum(1) / target.sum(1)
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


def aligned(
    features, labels, sup_logits=None, *, temperature, alpha, beta, gamma, supt=1.0, log_prior=None, class_weight=None
):
    """The aligned loss of acl_kernels/ops/contrastive/README.md (mode `aligned`) written out term by
    term, one anchor and one positive at a time (slow; tiny inputs).

    features [N, d] (all rows are anchors), sup_logits [N, C] or None, class_weight(c, anchor_label)
    -> negative weight w of a sample of class c (None: 1).
    """
    n = features.shape[0]
    sims = features @ features.T / temperature
    losses = []
    for i in range(n):
        pos, neg = [], []  # (logit, target weight) and (logit, denominator weight)
        if sup_logits is not None:
            centre = sup_logits[i] + (0 if log_prior is None else log_prior)
            for c in range(sup_logits.shape[1]):
                (pos if c == labels[i] else neg).append((centre[c] / supt, beta if c == labels[i] else 1.0))
        for j in range(n):
            if j == i:
                continue
            if labels[j] == labels[i]:
                pos.append((sims[i, j], alpha))
            else:
                w = 1.0 if class_weight is None else class_weight(int(labels[j]), int(labels[i]))
                neg.append((sims[i, j], gamma * w))
        a = sum(t for _, t in pos)
        if a == 0:
            losses.append(features.sum() * 0)
            continue
        neg_mass = sum(w * torch.exp(l) for l, w in neg) if neg else 0.0
        terms = [t * torch.log(torch.exp(l) / (torch.exp(l) + neg_mass)) for l, t in pos]
        losses.append(-sum(terms) / a)
    return torch.stack(losses).mean()


def moco_step(net, key_net, im_q, im_k, labels, queue, queue_labels, *, momentum, loss_kwargs, weight):
    """One training step of PaCo/LT's MoCo model, restated: the query view through the network (its
    classifier reads the pooled feature), the momentum update of the key network, the key view through
    the key network, features [q; k; queue], loss with anchors = q. Returns (loss, keys to enqueue).

    `net` / `key_net` expose backbone (pooled feature), head (projection) and classifier modules.
    """
    f = net.backbone(im_q)
    q = F.normalize(net.head(f), dim=1)
    logits_q = net.classifier(f)
    with torch.no_grad():
        for pk, pq in zip(key_net.parameters(), net.parameters()):
            pk.data = pk.data * momentum + pq.data * (1.0 - momentum)
        k = F.normalize(key_net.head(key_net.backbone(im_k)), dim=1)
    features = torch.cat([q, k, queue])
    target = torch.cat([labels, labels, queue_labels])
    loss = paco(features, target, logits_q, K=queue.shape[0], weight=weight, queries_only=True, **loss_kwargs)
    return loss, k


def gpaco_step(net, im_q, im_k, labels, queue, queue_labels, *, loss_kwargs, weight):
    """One training step of GPaCo/LT's model, restated: each view through the same network in its own
    forward, features [q; k; queue] with every in-batch row an anchor, classifier logits [q; k].
    Returns (loss, keys to enqueue: the key view only)."""
    fq, fk = net.backbone(im_q), net.backbone(im_k)
    q, k = F.normalize(net.head(fq), dim=1), F.normalize(net.head(fk), dim=1)
    logits = torch.cat([net.classifier(fq), net.classifier(fk)])
    features = torch.cat([q, k, queue])
    target = torch.cat([labels, labels, queue_labels])
    loss = paco(features, target, logits, K=queue.shape[0], weight=weight, queries_only=False, **loss_kwargs)
    return loss, k.detach()
