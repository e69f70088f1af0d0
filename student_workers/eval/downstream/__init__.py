"""Downstream evaluation of text students (docs/methods.md#downstream-evaluation): reverse-dictionary retrieval,
a lexname linear probe and layer-decay finetuning on WordNet synsets held out from distillation.

Modules: ``config`` (sizes), ``wordnet_tasks``, ``encoder``, ``retrieval``, ``probe``, ``finetune``,
``report`` (:func:`evaluate_run` (writes ``<run dir>/eval.json``), :func:`evaluate_models`,
:func:`format_table`); CLI ``python -m student_workers.eval.evaluate --run <run dir>``.
"""
