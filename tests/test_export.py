"""Exported students load with their ecosystem's own loader, in a process that never imports
kdserve, and give the same embeddings as the student did."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from student_workers.data.tokenizer import load_tokenizer
from student_workers.models.export import export_student
from student_workers.models.base import StudentConfig
from student_workers.models.build import build_student

TEXTS = ["a domesticated carnivorous mammal", "move fast by using one's feet", "x", "the largest planet of the solar system"]
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def run_clean(script: str, cwd: Path) -> None:
    """Run ``script`` in a fresh interpreter whose path holds neither this repo nor kdserve; it
    asserts itself that kdserve/student_workers were never imported."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    guard = "\nimport sys\nassert not any(m.split('.')[0] in ('kdserve', 'student_workers', 'teacher_server') for m in sys.modules), 'project imported'\n"
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script) + guard], check=False, cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@torch.no_grad()
def test_hf_text_export_loads_in_transformers_and_sentence_transformers(tmp_path):
    torch.manual_seed(0)
    student = build_student(StudentConfig(kind="hf_text", name="bert", kwargs=TINY_BERT)).eval()
    tok = load_tokenizer("minilm")
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    want = student({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}).embedding.numpy()  # (4, 32)
    out = export_student(student, tmp_path / "export", tokenizer_name="minilm")
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    np.save(tmp_path / "want.npy", want)
    run_clean(f"""
        import numpy as np, torch
        from transformers import AutoModel, AutoTokenizer
        from sentence_transformers import SentenceTransformer
        d, texts, want = {str(out)!r}, {TEXTS!r}, np.load({str(tmp_path / 'want.npy')!r})
        model, tok = AutoModel.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)
        enc = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        hf = ((h * m).sum(1) / m.sum(1)).numpy()
        st = SentenceTransformer(d, device="cpu").encode(texts, convert_to_numpy=True)
        assert np.allclose(hf, want, atol=1e-5), np.abs(hf - want).max()
        assert np.allclose(st, want, atol=1e-5), np.abs(st - want).max()
    """, tmp_path)


@pytest.mark.parametrize("cfg", [
    StudentConfig(kind="timm_vit", name="vit_tiny_patch16_224",
                  kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}),
    StudentConfig(kind="timm_shallow", name="deit_tiny_patch16_224", num_layers=1,
                  kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}),
], ids=["timm_vit", "timm_shallow"])
@torch.no_grad()
def test_timm_export_loads_with_create_model(tmp_path, cfg):
    torch.manual_seed(0)
    student = build_student(cfg).eval()
    x = torch.rand(3, 3, 32, 32)  # RGB in [0, 1]
    want = student({"pixel_values": x}).embedding.numpy()  # (3, 32)
    out = export_student(student, tmp_path / "export", config=cfg)
    torch.save(x, tmp_path / "x.pt")
    np.save(tmp_path / "want.npy", want)
    run_clean(f"""
        import json, numpy as np, timm, torch
        from safetensors.torch import load_file
        meta = json.load(open({str(out / 'timm_model.json')!r}))
        model = timm.create_model(meta["model_name"], pretrained=False, **meta["kwargs"]).eval()
        model.load_state_dict(load_file({str(out / 'model.safetensors')!r}), strict=True)
        x = torch.load({str(tmp_path / 'x.pt')!r})
        mean, std = torch.tensor(meta["mean"]).view(1, 3, 1, 1), torch.tensor(meta["std"]).view(1, 3, 1, 1)
        with torch.no_grad():
            got = model.forward_head(model.forward_features((x - mean) / std), pre_logits=True).numpy()
        want = np.load({str(tmp_path / 'want.npy')!r})
        assert np.allclose(got, want, atol=1e-5), np.abs(got - want).max()
    """, tmp_path)


def test_export_without_config_for_timm_is_an_error(tmp_path):
    student = build_student(StudentConfig(kind="timm_vit", name="vit_tiny_patch16_224",
                                          kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}))
    with pytest.raises(ValueError, match="config="):
        export_student(student, tmp_path / "e")


@torch.no_grad()
def test_timm_cnn_export_loads_with_torch_jit(tmp_path):
    """A MobileNet student with kdserve's narrower head: the TorchScript module gives its logits with
    PyTorch alone."""
    cfg = StudentConfig(kind="timm_cnn", name="mobilenetv3_small_050", kwargs={"head_features": 64, "num_classes": 10})
    torch.manual_seed(0)
    student = build_student(cfg).eval()
    x = torch.rand(2, 3, 48, 48)  # RGB in [0, 1]
    want = student({"pixel_values": x}).logits.numpy()  # (2, 10)
    out = export_student(student, tmp_path / "export", config=cfg)
    torch.save(x, tmp_path / "x.pt")
    np.save(tmp_path / "want.npy", want)
    run_clean(f"""
        import json, numpy as np, torch
        meta = json.load(open({str(out / 'timm_model.json')!r}))
        model = torch.jit.load({str(out)!r} + "/" + meta["torchscript"]).eval()
        x = torch.load({str(tmp_path / 'x.pt')!r})
        mean, std = torch.tensor(meta["mean"]).view(1, 3, 1, 1), torch.tensor(meta["std"]).view(1, 3, 1, 1)
        with torch.no_grad():
            got = model((x - mean) / std).numpy()
        want = np.load({str(tmp_path / 'want.npy')!r})
        assert np.allclose(got, want, atol=1e-5), np.abs(got - want).max()
    """, tmp_path)
