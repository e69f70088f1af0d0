"""What a comparison measures with the teacher: a distilled student's scores on the scoring split,
and each loss group's size at initialisation."""
from __future__ import annotations

from kdjob.evaluate import fresh_distiller
from kdjob.variants import KD_WEIGHTS


def eval_split(cfg, split: str):
    """The whole scoring split, in a fixed order, without augmentation."""
    from student_workers.data.build import build_dataset

    kwargs = {**cfg.data.kwargs, "split": split, "augment": False}
    kwargs.pop("seed", None)
    return build_dataset(cfg.data.dataset, **kwargs)


def score(cfg, address, info, state_dict, split: str, batch_size: int = 64) -> dict:
    """Category accuracy, image->text recall@1/@5 among all captions of ``split`` (student's
    image embedding vs text embedding, cosine), top-1 agreement with the teacher's classifier, and
    the teacher's own accuracy on the same samples."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from kdserve import wire
    from student_workers.train.batches import make_collate, teacher_inputs
    from student_workers.train.teacher import image_size, teacher_client

    student = fresh_distiller(cfg, info, state_dict).student.eval()
    loader = DataLoader(eval_split(cfg, split), batch_size=batch_size, shuffle=False, collate_fn=make_collate(cfg))
    n = correct = agree = teacher_ok = 0
    img, txt = [], []
    with torch.no_grad(), teacher_client(cfg, address, f"{cfg.run.name}-score") as client:
        for batch in loader:
            inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
            out = student(inputs)
            t = client.get_targets(teacher_inputs(inputs, image_size(info)),  # the teacher's resolution
                                   wire.target_spec(logits=True))["logits"].float()  # (B, C)
            pred = out.logits.argmax(-1)
            correct += int((pred == batch["labels"]).sum())
            agree += int((pred == t.argmax(-1)).sum())
            teacher_ok += int((t.argmax(-1) == batch["labels"]).sum())
            n += len(pred)
            img.append(F.normalize(out.embedding.float(), dim=-1))  # (B, E)
            txt.append(F.normalize(out.text_embedding.float(), dim=-1))  # (B, E)
    sim = torch.cat(img) @ torch.cat(txt).t()  # (N, N): image i vs caption j
    rank = (sim > sim.diagonal()[:, None]).sum(-1)  # captions scored above the true one
    return {"samples": n, "accuracy": correct / n, "recall@1": float((rank < 1).float().mean()),
            "recall@5": float((rank < 5).float().mean()), "top1_agreement": agree / n,
            "teacher_accuracy": teacher_ok / n}


LOSS_GROUPS = {"task": "task_weight", "kd": "logits_weight", "hid": "feature_weight", "attn": "attention_weight",
               "nce": "nce_weight"}


def loss_scales(cfg, address, info, batches: int = 2) -> dict[str, dict[str, float]]:
    """Each loss group at initialisation on a few training batches: its weighted value and the
    norm of its weighted gradient on the student's parameters (what steers the first steps)."""
    import itertools

    import torch

    from student_workers.train.batches import batch_labels
    from student_workers.train.batches import batches as train_batches
    from student_workers.train.batches import student_inputs, teacher_inputs
    from student_workers.train.teacher import image_size, teacher_client

    distiller = fresh_distiller(cfg, info)
    params = [p for p in distiller.student.parameters() if p.requires_grad]
    groups = {g: w for g, w in LOSS_GROUPS.items() if getattr(cfg.distill, w) > 0}
    sums = {g: {"value": 0.0, "grad_norm": 0.0} for g in groups}
    full = cfg.distill
    with teacher_client(cfg, address, f"{cfg.run.name}-scales") as client:
        for batch in itertools.islice(train_batches(cfg, 0, 1), batches):
            inputs = student_inputs(batch)
            targets = (client.get_targets(teacher_inputs(inputs, image_size(info)), distiller.target_spec())
                       if distiller.needs_teacher else {})
            for g, w in groups.items():
                only = full.model_copy(update={k: (getattr(full, k) if k == w else 0.0)
                                               for k in (*LOSS_GROUPS.values(), *KD_WEIGHTS)})
                distiller.cfg = only
                total, _ = distiller(inputs, targets, batch_labels(batch))
                grads = torch.autograd.grad(total, params, allow_unused=True)
                sums[g]["value"] += float(total.detach()) / batches
                sums[g]["grad_norm"] += float(torch.sqrt(sum((x.float() ** 2).sum() for x in grads if x is not None))) / batches
            distiller.cfg = full
    return sums
