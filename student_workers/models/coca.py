"""The ``coca`` student kind: a CoCa-style vision-language student with three modules.

A unimodal student returns :class:`~student_workers.models.base.StudentOutput` (one module, lists).
A multi-module student returns :class:`MultiModuleOutput`, the same fields keyed by module name
("image", "text", "multimodal"): ``hidden[m]`` is the list of block outputs of module ``m`` and
``attentions[m][l - 1]`` is block ``l``'s attention (``None`` when not asked for), indexed exactly
like the single-module lists. Code that handles both checks ``isinstance(out.hidden, dict)``.

Inputs: ``pixel_values`` (B, 3, S, S) RGB in [0, 1] and ``input_ids`` / ``attention_mask`` (B, T)
of the teacher's tokenizer ("minilm"), the same view the teacher receives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from torch import Tensor

from kdmodels.coca import CROSS, MODULES, CoCaModel, build_config, load_checkpoint
from kdserve.registry import register
from student_workers.models.base import Student, StudentConfig


@dataclass
class MultiModuleOutput:
    """One forward of a multi-module student (every tensor keeps its autograd graph)."""

    hidden: dict[str, list[Tensor]]  # module -> L_m x (B, T_m, D_m), block outputs before final norms
    attentions: dict[str, list[Tensor | None]] | None  # module -> L_m entries, (B, H, T, T) or None
    logits: Tensor | None  # (B, C) classifier on the image embedding
    embedding: Tensor  # (B, E) image embedding (contrastive space, not normalised)
    token_masks: dict[str, Tensor | None]  # module -> (B, T) 1 for real tokens, None: all real
    itm_logits: Tensor | None = None  # (B, B) image-text similarity (rows images, columns texts)
    caption_logits: Tensor | None = None  # (B, T, V) next-token scores
    text_embedding: Tensor | None = None  # (B, E)
    cross_attentions: list[Tensor | None] | None = None  # multimodal cross-attention, (B, H, T, N_image)


NeedAttention = bool | Mapping[str, Iterable[int]] | None


class CoCaStudent(Student):
    """Wraps :class:`kdmodels.coca.CoCaModel`. ``forward(inputs, need_attention)``:
    ``need_attention`` is False, True (every block of every module) or
    ``{module: 1-based blocks}`` (modules "image", "text", "multimodal", and "multimodal.cross"
    for the decoder's cross-attention)."""

    input_kind = "image_text"

    def __init__(self, model: CoCaModel):
        super().__init__()
        self.model = model
        cfg = model.cfg
        self.cfg = cfg
        self.modules_info = cfg.module_shapes()
        self.image_size = (cfg.image_size, cfg.image_size)
        self.num_classes = int(cfg.num_classes)

    def attention_request(self, need: NeedAttention) -> dict[str, set[int]]:
        if need is None or need is False:
            return {}
        if need is True:
            return {m: set(range(1, n + 1)) for m, (n, _, _) in self.modules_info.items()}
        if not isinstance(need, Mapping):
            raise ValueError(
                "a coca student takes need_attention as True/False or {module: blocks} "
                f"with modules {list(MODULES)}; got {need!r}"
            )
        out = {}
        for m, layers in need.items():
            depth = self.modules_info["multimodal" if m == CROSS else m][0] if m in (*MODULES, CROSS) else None
            if depth is None:
                raise ValueError(f"need_attention: unknown module {m!r}; this student has {list(MODULES)}")
            layers = {int(l) for l in layers}
            bad = sorted(l for l in layers if not 1 <= l <= depth)
            if bad:
                raise ValueError(f"attention requested for {m} blocks {bad}; module {m!r} has blocks 1..{depth} (1-based)")
            out[m] = layers
        return out

    def forward(self, inputs: Mapping[str, Tensor], need_attention: NeedAttention = False) -> MultiModuleOutput:
        need = self.attention_request(need_attention)
        if "input_ids" not in inputs:
            raise ValueError("a coca student needs pixel_values AND input_ids (collate with collate_image_text)")
        mask = inputs.get("attention_mask")
        out = self.model(inputs["pixel_values"], inputs["input_ids"], mask, need_attention=need)
        attentions = None
        if any(need.get(m) for m in MODULES):
            attentions = {
                m: [out.attentions.get(m, {}).get(l) for l in range(1, self.modules_info[m][0] + 1)] for m in MODULES
            }
        cross = None
        if need.get(CROSS):
            cross = [out.attentions[CROSS].get(l) for l in range(1, self.modules_info["multimodal"][0] + 1)]
        return MultiModuleOutput(
            hidden=out.hidden,
            attentions=attentions,
            logits=out.logits,
            embedding=out.image_embed,
            token_masks={"image": None, "text": mask, "multimodal": mask},
            itm_logits=out.itm_logits,
            caption_logits=out.caption_logits,
            text_embedding=out.text_embed,
            cross_attentions=cross,
        )


@register("student", "coca")
def coca(cfg: StudentConfig) -> CoCaStudent:
    """A CoCa-style student. ``pretrained=False``: random init from CoCaConfig defaults
    (``name: ""``) or the TINY preset (``name: tiny``), ``kwargs`` overriding CoCaConfig fields.
    ``pretrained=True``: ``name`` is a checkpoint (``save_checkpoint`` /
    ``train_vlm_teacher``); ``kwargs`` may lower ``vision_layers`` / ``text_layers`` /
    ``multimodal_layers`` (blocks copied with the uniform layer map, as OPTIMA initialises its
    students). Reads: name, pretrained, kwargs."""
    unused = [f for f in ("num_layers", "init_from", "init_layers", "mean", "std") if getattr(cfg, f) is not None]
    if cfg.num_classes:
        unused.append("num_classes")
    if unused:
        raise ValueError(f"student kind coca takes its architecture from kwargs (CoCaConfig fields); unset {unused}")
    if cfg.pretrained:
        if cfg.name in ("", "tiny"):
            raise ValueError("coca student with pretrained=true needs name: a checkpoint path (runs/coca_teacher.pt)")
        model, _ = load_checkpoint(cfg.name, cfg.kwargs)
        return CoCaStudent(model)
    return CoCaStudent(CoCaModel(build_config(cfg.name, cfg.kwargs)))
