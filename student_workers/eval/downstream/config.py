"""How big the downstream evaluation is (a job's ``evaluate`` section; the CLI's ``--set``)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from kdserve.config import Strict


class DownstreamConfig(Strict):
    """Sizes of the evaluation; the defaults take a few minutes on 2 CPU cores for 4 models."""

    num_candidates: int = Field(5000, ge=2, description="Reverse dictionary: distinct candidate headwords.")
    max_queries: int = Field(1000, ge=1, description="Reverse dictionary: held-out definitions queried.")
    probe_train: int = Field(5000, ge=2, description="Lexname probe/finetune: training definitions (not held out).")
    probe_test: int = Field(2000, ge=1, description="Lexname probe/finetune: test definitions (held out).")
    finetune_steps: int = Field(150, ge=0, description="Finetuning budget in steps (0: skip finetuning).")
    finetune_batch: int = Field(32, ge=1, description="Finetuning batch size.")
    base_lr: float = Field(1e-4, gt=0, description="Finetuning LR of the head; layer l gets base_lr*decay^(L+1-l).")
    decay: float = Field(0.81, gt=0, le=1, description="Layer-wise LR decay (docs/methods.md#downstream-evaluation).")
    held_out_fraction: float | None = Field(None, description="Held-out rule; None: the run's wordnet setting (0.05).")
    split: Literal["test", "validation"] = Field(
        "test", description="Which held-out synsets are scored: test (held out at held_out_fraction) or validation "
        "(held out at twice it but not at it: for tuning, with the run's data trained at held_out_fraction x 2).")
    batch_size: int = Field(128, ge=1, description="Texts per encoder forward.")
    max_length: int = Field(64, ge=2, description="Tokens per definition.")
    seed: int = Field(0, description="Seed of task sampling, probe and finetuning.")
    speed_samples: int = Field(512, ge=1, description="Test definitions encoded (best of 3 passes) for samples/s.")
