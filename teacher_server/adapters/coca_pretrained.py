"""The CoCa-style teacher from pretrained parts (``kdmodels.coca_pretrained``): ``coca_pretrained:<checkpoint.pt>``.

``coca_pretrained:<file>`` (pretrained=true): a file written by
``python -m student_workers.models.train_coca_pretrained``; its towers come from the packages
(EfficientNet-lite0 ImageNet weights, all-MiniLM-L6-v2). ``coca_pretrained:tiny`` with
pretrained=false: random towers and a test-size text tower (``model_kwargs``: config fields).

Modules:
- ``image``: the 7 EfficientNet-lite0 stages; hidden state ``l`` is stage ``l``'s output globally
  average-pooled, ``(B, 1, C_l)`` (widths in ``layer_sizes``, as ``timm_cnn``). No attention:
  ``num_heads`` 0, and a spec asking for it is refused (INVALID_ARGUMENT naming the module).
- ``text``: the 6 MiniLM layers, ``(B, T, 384)``, attention ``(B, 12, T, T)`` (bidirectional,
  padding keys exactly 0).
- ``multimodal``: the decoder blocks, ``(B, T, D)``, causal self-attention ``(B, H, T, T)``.
Logits: the classifier (on the image embedding, or on the decoder output when the checkpoint
classifies from ``multimodal``).
"""
from __future__ import annotations

from kdmodels.coca_pretrained import MODULES, PretrainedCoCa, PretrainedCoCaConfig, load_checkpoint
from kdserve.registry import register
from teacher_server.adapters.base import Capture, TeacherAdapter, check_token_ids
from teacher_server.spec import InputInfo, ModuleInfo, SpecError

TOKENIZER = "minilm"


class PretrainedCoCaTeacher(TeacherAdapter):
    def __init__(self, model: PretrainedCoCa, model_name: str):
        self.model = model.eval()
        self.model_name = model_name
        self.cfg = cfg = model.cfg
        s = cfg.image_size
        shapes = model.module_shapes()
        widths = tuple(model.stage_widths)
        self.modules = [
            ModuleInfo("image", len(widths), max(widths), 0, 1, layer_sizes=widths),
            ModuleInfo("text", *shapes["text"], -1),
            ModuleInfo("multimodal", *shapes["multimodal"], -1),
        ]
        self.inputs = [
            InputInfo("pixel_values", "float32", (-1, 3, s, s), True,
                      "RGB in [0, 1], (B, 3, H, W), not normalized: the server applies the ImageNet mean/std"),
            InputInfo("input_ids", "int64", (-1, -1), True, f"token ids of the {TOKENIZER} tokenizer (caption)"),
            InputInfo("attention_mask", "int64", (-1, -1), False, "1 for real tokens, 0 for padding (right padding)"),
        ]
        self.num_classes = int(cfg.num_classes)
        self.preprocessing = {
            "pixel_values": "RGB in [0, 1], not normalized; the server normalizes",
            "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
            "image_size": [s, s], "tokenizer": TOKENIZER, "max_length": int(cfg.max_text_len),
        }

    def check_values(self, inputs):
        check_token_ids(inputs, int(self.model.text_tower.config.vocab_size), int(self.cfg.max_text_len))
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if ids is not None and mask is not None and tuple(ids.shape) != tuple(mask.shape):
            raise SpecError(f"inputs['attention_mask']: shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")

    def token_mask(self, inputs, module):
        return None if module == "image" else inputs.get("attention_mask")

    def forward(self, inputs, hidden, attention, logits) -> Capture:
        m = self.model
        if attention.get("image"):
            raise SpecError("spec.attention: module 'image' (EfficientNet-lite0 stages) has no attention maps")
        wanted = set(hidden) | set(attention)
        mm_logits = logits and m.classifier is not None and m.cfg.classify_from == "multimodal"
        mask = inputs.get("attention_mask")
        stages = m.image_stages(inputs["pixel_values"])
        found_h = {"image": [s.mean(dim=(2, 3)).unsqueeze(1) for s in stages]}  # (B, 1, C_l)
        found_a: dict[str, list] = {}
        tokens, image_embed = m.image_heads(stages[-1])
        if "text" in wanted:
            found_h["text"], found_a["text"] = m.encode_text(inputs["input_ids"], mask, bool(attention.get("text")))
        decoded = None
        if "multimodal" in wanted or mm_logits:
            need = attention.get("multimodal", ())
            decoded, found_h["multimodal"], att = m.decode(inputs["input_ids"], mask, tokens, need)
            found_a["multimodal"] = [att.get(l) for l in range(1, m.cfg.decoder_layers + 1)]
        cap = Capture()
        if logits and m.classifier is not None:
            cap.logits = m.classify(image_embed, decoded, mask)
        for module, layers in hidden.items():
            for l in layers:
                cap.hidden[(module, l)] = found_h[module][l - 1]
        for module, layers in attention.items():
            for l in layers:
                cap.attention[(module, l)] = found_a[module][l - 1]  # (B, H, T, T)
        return cap


@register("teacher", "coca_pretrained")
def load_coca_pretrained(name: str, pretrained: bool, model_kwargs: dict, task: str = "") -> PretrainedCoCaTeacher:
    """``coca_pretrained:<checkpoint.pt>`` (pretrained) or ``coca_pretrained:tiny`` with pretrained=false."""
    if task:
        raise ValueError(f"hf_task {task!r} does not apply to coca_pretrained teachers (their heads come with the model)")
    if pretrained:
        if name in ("", "tiny"):
            raise ValueError("coca_pretrained with pretrained=true needs a checkpoint path: "
                             "coca_pretrained:runs/coca_pretrained.pt (or pretrained: false for coca_pretrained:tiny)")
        if model_kwargs:
            raise ValueError("model_kwargs do not apply to a trained coca_pretrained checkpoint")
        model, _ = load_checkpoint(name)
        return PretrainedCoCaTeacher(model, f"coca_pretrained:{name}")
    if name not in ("", "tiny"):
        raise ValueError(f"coca_pretrained:{name} with pretrained=false: use coca_pretrained:tiny (random towers)")
    tiny = dict(towers="random", image_size=64, decoder_width=32, decoder_layers=2, decoder_heads=2, embed_dim=32)
    return PretrainedCoCaTeacher(PretrainedCoCa(PretrainedCoCaConfig(**{**tiny, **model_kwargs})), "coca_pretrained:tiny")


__all__ = ["MODULES", "PretrainedCoCaTeacher", "load_coca_pretrained"]
