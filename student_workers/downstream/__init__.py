"""Downstream evaluation of text students (methods.md section 8): reverse-dictionary retrieval,
a lexname linear probe and layer-decay finetuning on WordNet synsets held out from distillation.

Entry points: :func:`evaluate_run` (writes ``<run dir>/eval.json``), :func:`evaluate_models`,
:func:`format_table`; CLI ``python -m student_workers.evaluate --run <run dir>``.
"""
from student_workers.downstream.finetune import finetune_classifier, layer_decay_groups  # noqa: F401
from student_workers.downstream.probe import linear_probe, majority_accuracy  # noqa: F401
from student_workers.downstream.report import (  # noqa: F401
    DownstreamConfig,
    evaluate_models,
    evaluate_run,
    format_table,
)
from student_workers.downstream.retrieval import recall_at_k  # noqa: F401
