"""Student vs teacher on held-out data: how closely the distilled student reproduces the teacher."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from kdserve import wire
from student_workers.distiller import Distiller, module_views
from student_workers.losses import masked_mean_pool


@torch.no_grad()
def agreement(distiller: Distiller, client, batches, spec, max_batches: int) -> dict[str, float]:
    """Cosine of mean-pooled embeddings on the last mapped layer pair (student projected to the
    teacher's width), and top-1 agreement when logits are distilled."""
    distiller.eval()
    cos, top1, acc, n, labelled = 0.0, 0.0, 0.0, 0, False
    for batch in itertools.islice(batches, max_batches):
        inputs = {k: v for k, v in batch.items() if k in ("pixel_values", "input_ids", "attention_mask")}
        targets = client.get_targets(inputs, spec) if distiller.needs_teacher else {}
        labels = batch.get("labels", batch.get("label"))
        out = distiller.student(inputs)
        view = next(iter(module_views(out).values()))
        mask = view.mask
        m = distiller.modules_list[0]
        if distiller.pairs.get(m) and distiller.cfg.feature_weight > 0 and targets:
            s, t = distiller.pairs[m][-1]
            hs = distiller.proj[f"{m}_{s}"](view.hidden[s - 1])  # (B, T, D_t)
            ht = targets[f"hidden.{m}.{t}"].float()  # (B, T, D_t)
            cos += F.cosine_similarity(masked_mean_pool(hs, mask), masked_mean_pool(ht, mask), dim=-1).sum().item()
        elif distiller.cfg.data2vec_weight > 0:
            from kdserve.targets import data2vec_target

            y = distiller.d2v_proj[m](data2vec_target(view.hidden, distiller.cfg.data2vec_eps, mask))
            t = targets[f"data2vec.{m}"].float()
            cos += F.cosine_similarity(masked_mean_pool(y, mask), masked_mean_pool(t, mask), dim=-1).sum().item()
        if "logits" in targets and out.logits is not None:
            top1 += (out.logits.argmax(-1) == targets["logits"].argmax(-1)).float().sum().item()
        if labels is not None and out.logits is not None:
            acc += (out.logits.argmax(-1) == labels).float().sum().item()
            labelled = True
        n += wire.batch_size(inputs)
    distiller.train()
    result = {"samples": n, "cosine": cos / max(n, 1)}
    if distiller.cfg.logits_weight > 0:
        result["top1_agreement"] = top1 / max(n, 1)
    if labelled:
        result["accuracy"] = acc / max(n, 1)
    return result
