"""CoCa-style vision-language teachers (kdmodels.coca) with three modules.

``coca:<checkpoint.pt>`` (pretrained=true): a file written by
``kdmodels.coca.save_checkpoint`` (e.g. ``python -m student_workers.models.train_vlm_teacher``).
``coca`` / ``coca:tiny`` with pretrained=false: random init from the defaults / the TINY preset,
``model_kwargs`` overriding CoCaConfig fields.

Modules: ``image`` (ViT, ``(S/P)^2 + 1`` tokens), ``text`` (causal text decoder, one token per
input token) and ``multimodal`` (decoder with cross-attention to the image; one token per input
token). Hidden state ``l`` is block ``l``'s output before the module's final norm; attention
``l`` is block ``l``'s post-softmax SELF-attention map (for ``multimodal``: causal, over text
tokens), computed explicitly for the requested blocks only. Logits: the classifier on the image
embedding. Only the modules a request needs run: an image-only request skips the text side.
"""
from __future__ import annotations


from kdmodels.coca import CoCaModel, build_config, load_checkpoint
from kdserve.registry import register
from teacher_server.adapters.base import Capture, TeacherAdapter, check_token_ids
from teacher_server.spec import InputInfo, ModuleInfo

TOKENIZER = "minilm"


class CoCaTeacher(TeacherAdapter):
    def __init__(self, model: CoCaModel, model_name: str):
        self.model = model.eval()
        self.model_name = model_name
        cfg = model.cfg
        self.cfg = cfg
        s = cfg.image_size
        self.modules = [
            ModuleInfo("image", cfg.vision_layers, cfg.vision_width, cfg.vision_heads, cfg.num_image_tokens),
            ModuleInfo("text", cfg.text_layers, cfg.text_width, cfg.heads, -1),
            ModuleInfo("multimodal", cfg.multimodal_layers, cfg.text_width, cfg.heads, -1),
        ]
        self.inputs = [
            InputInfo(
                "pixel_values", "float32", (-1, 3, s, s), True,
                "RGB in [0, 1], (B, 3, H, W), not normalized: the server applies the teacher's mean/std",
            ),
            InputInfo("input_ids", "int64", (-1, -1), True, f"token ids of the {TOKENIZER} tokenizer (caption)"),
            InputInfo("attention_mask", "int64", (-1, -1), False, "1 for real tokens, 0 for padding (right padding)"),
        ]
        self.num_classes = int(cfg.num_classes)
        self.preprocessing = {
            "pixel_values": "RGB in [0, 1], not normalized; the server normalizes",
            "mean": list(cfg.mean),
            "std": list(cfg.std),
            "image_size": [s, s],
            "tokenizer": TOKENIZER,
            "max_length": int(cfg.max_text_len),
        }

    def check_values(self, inputs):
        check_token_ids(inputs, int(self.cfg.vocab_size), int(self.cfg.max_text_len))
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if ids is not None and mask is not None and tuple(ids.shape) != tuple(mask.shape):
            from teacher_server.spec import SpecError

            raise SpecError(
                f"inputs['attention_mask']: shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}"
            )

    def token_mask(self, inputs, module):
        return None if module == "image" else inputs.get("attention_mask")

    def forward(self, inputs, hidden, attention, logits) -> Capture:
        m = self.model
        wanted = set(hidden) | set(attention)
        need_text = bool(wanted & {"text", "multimodal"})
        att = {k: set(v) for k, v in attention.items()}
        cap = Capture()
        img_tok, img_h, img_a = m.encode_image(inputs["pixel_values"], att.get("image", ()))
        found_h = {"image": img_h}
        found_a = {"image": img_a}
        if logits:
            cap.logits = m.classifier(m.image_embedding(img_tok)) if m.classifier is not None else None
        if need_text:
            mask = inputs.get("attention_mask")
            txt_tok, txt_h, txt_a = m.encode_text(inputs["input_ids"], mask, att.get("text", ()))
            found_h["text"], found_a["text"] = txt_h, txt_a
            if "multimodal" in wanted:
                _, mm_h, mm_a, _ = m.decode(txt_tok, img_tok, mask, att.get("multimodal", ()))
                found_h["multimodal"], found_a["multimodal"] = mm_h, mm_a
        for module, layers in hidden.items():
            for l in layers:
                cap.hidden[(module, l)] = found_h[module][l - 1]  # (B, T, D)
        for module, layers in attention.items():
            for l in layers:
                cap.attention[(module, l)] = found_a[module][l]  # (B, H, T, T)
        return cap


@register("teacher", "coca")
def load_coca(name: str, pretrained: bool, model_kwargs: dict, task: str = "") -> CoCaTeacher:
    """``coca:<checkpoint.pt>`` (pretrained) or ``coca`` / ``coca:tiny`` with pretrained=false."""
    if task:
        raise ValueError(f"hf_task {task!r} does not apply to coca teachers (their heads come with the model)")
    if pretrained:
        if name in ("", "tiny"):
            raise ValueError(
                "coca with pretrained=true needs a checkpoint path: coca:runs/coca_teacher.pt "
                "(or set pretrained: false for a random-init model)"
            )
        model, _ = load_checkpoint(name, model_kwargs)
        return CoCaTeacher(model, f"coca:{name}")
    return CoCaTeacher(CoCaModel(build_config(name, model_kwargs)), f"coca:{name or 'default'}")
