"""Export a trained student in its ecosystem's own format, loadable without kdserve.

- text (``hf_text``): a Hugging Face model dir (``config.json``, ``model.safetensors``, the
  teacher's tokenizer) for ``AutoModel.from_pretrained(dir)``; with ``sentence_transformers=True``
  also the sentence-transformers layout (``modules.json``, ``sentence_bert_config.json``,
  ``1_Pooling/config.json`` with mean pooling), so ``SentenceTransformer(dir).encode(texts)``
  equals the student's ``.embedding`` (masked mean of the last hidden state, not normalised).
- vision (``timm_vit``, ``timm_shallow``): ``model.safetensors`` plus ``timm_model.json`` with the
  model name and kwargs: ``timm.create_model(name, pretrained=False, **kwargs)`` then
  ``load_state_dict``. ``timm_shallow`` students are written with ``depth`` = their block count.

Projection heads, NCE queues and optimizer state are not exported: they stay in the run's
checkpoint (``checkpoint_*/state.pt``), which only kdserve code can resume from.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from kdserve.packaged import resolve_hf_path
from student_workers.models.base import Student, StudentConfig
from student_workers.models.cnn import TimmCNNStudent
from student_workers.models.hf_text import HFTextStudent
from student_workers.models.timm_vit import TimmStudent

TIMM_META = "timm_model.json"


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def export_hf_text(student: HFTextStudent, out: Path, tokenizer_name: str, sentence_transformers: bool,
                   max_seq_length: int) -> None:
    from transformers import AutoTokenizer

    # The pooler was dropped at build time (unused by the embedding); from_pretrained creates a
    # fresh one that nothing here reads.
    student.model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(resolve_hf_path(tokenizer_name)).save_pretrained(out)
    if student.head is not None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in student.head.state_dict().items()}, str(out / "head.safetensors"))
    if not sentence_transformers:
        return
    dim = int(student.model.config.hidden_size)
    _write_json(out / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ])
    _write_json(out / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    _write_json(out / "1_Pooling" / "config.json", {
        "word_embedding_dimension": dim, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
    })


def export_timm(student: TimmStudent, out: Path, config: StudentConfig) -> None:
    from safetensors.torch import save_file

    if not config.name:
        raise ValueError("exporting a timm student needs its StudentConfig with the timm model name")
    kwargs = dict(config.kwargs)
    if config.kind == "timm_shallow":
        kwargs["depth"] = len(student.model.blocks)  # only the kept blocks are in the state dict
    state = {k: v.detach().contiguous() for k, v in student.model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    _write_json(out / TIMM_META, {
        "model_name": config.name, "kwargs": kwargs, "image_size": list(student.image_size),
        "mean": student.mean.flatten().tolist(), "std": student.std.flatten().tolist(),
        "input": "RGB in [0, 1], normalised with mean/std",
    })


def export_timm_cnn(student: TimmCNNStudent, out: Path, config: StudentConfig) -> None:
    """A timm CNN: its state dict and name/kwargs as for ViTs, and, because ``head_features`` (a
    narrower MobileNetV3 head) is not a ``timm.create_model`` argument, also the module traced to
    TorchScript (``torch.jit.load(dir/model.torchscript.pt)`` takes normalised (B, 3, H, W) images and
    returns logits), which loads with PyTorch alone."""
    import torch
    from safetensors.torch import save_file

    kwargs = {k: v for k, v in config.kwargs.items() if k != "head_features"}
    state = {k: v.detach().contiguous() for k, v in student.model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    model = student.model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates tracing; jit.load still reads it
        traced = torch.jit.trace(model, torch.zeros(1, 3, 64, 64))
    traced.save(str(out / "model.torchscript.pt"))
    _write_json(out / TIMM_META, {
        "model_name": config.name, "kwargs": kwargs, "head_features": config.kwargs.get("head_features"),
        "mean": student.mean.flatten().tolist(), "std": student.std.flatten().tolist(),
        "input": "RGB in [0, 1], normalised with mean/std; any size",
        "torchscript": "model.torchscript.pt",
    })


def export_student(student: Student, out_dir: str | Path, tokenizer_name: str = "minilm",
                   sentence_transformers: bool = True, config: StudentConfig | None = None,
                   max_seq_length: int = 256) -> Path:
    """Write ``student`` to ``out_dir`` (created) in its ecosystem's format; returns the dir.

    ``tokenizer_name``: the teacher's tokenizer the text student was trained with ('minilm' or a
    local HF dir). ``config``: the student's StudentConfig (required for timm students: the model
    name and kwargs are not recoverable from the module)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(student, HFTextStudent):
        export_hf_text(student, out, tokenizer_name, sentence_transformers, max_seq_length)
    elif isinstance(student, TimmCNNStudent):
        if config is None:
            raise ValueError("export_student(timm_cnn student) needs config= (its StudentConfig)")
        export_timm_cnn(student, out, config)
    elif isinstance(student, TimmStudent):
        if config is None:
            raise ValueError("export_student(timm student) needs config= (its StudentConfig)")
        export_timm(student, out, config)
    else:
        raise TypeError(f"no ecosystem export for {type(student).__name__}; the checkpoint holds its weights")
    return out


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Export the latest checkpoint of a run to ``<run dir>/export`` (or ``out_dir``)."""
    from student_workers.models.from_run import load_student, student_config
    from student_workers.train.run_dir import read_config

    cfg = read_config(run_dir)
    student, _ = load_student(run_dir)
    tokenizer = cfg.get("data", {}).get("tokenizer", "minilm")
    return export_student(student, out_dir or Path(run_dir) / "export", tokenizer_name=tokenizer,
                          config=student_config(cfg))
