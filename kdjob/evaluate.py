"""The student against the teacher on held-out data, on the driver: before and after distillation."""
from __future__ import annotations


def fresh_distiller(cfg, info, state_dict=None):
    """The Distiller exactly as a training run starts it (seeded with ``train.seed``), or with a
    checkpoint's ``state_dict``."""
    import torch

    from student_workers.losses.distiller import Distiller
    from student_workers.models.build import build_student

    torch.manual_seed(cfg.train.seed)
    distiller = Distiller(build_student(cfg.student), cfg.distill, info)
    if state_dict is not None:
        distiller.load_state_dict(state_dict)
    return distiller


def eval_batches(cfg):
    from student_workers.train.batches import batches

    held = cfg.model_copy(deep=True)
    held.data.kwargs = {**cfg.data.kwargs, "split": "held_out"}
    return batches(held, 0, 1)


def evaluate(cfg, address, info, state_dict=None) -> dict:
    from student_workers.eval.evaluate import agreement
    from student_workers.train.teacher import image_size, teacher_client

    distiller = fresh_distiller(cfg, info, state_dict)
    n = max(1, cfg.data.eval_samples // cfg.data.batch_size)
    with teacher_client(cfg, address, f"{cfg.run.name}-eval") as client:
        return agreement(distiller, client, eval_batches(cfg), distiller.target_spec(), n, image_size(info))
