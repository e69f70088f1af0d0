"""The driver side of a distillation job, shared by the scripts at the root (distill_job.py,
compare_vlm.py): the Ray cluster, the teacher the job uses (or deploys), the Ray Train fit and its
abort, and the before/after comparisons. It composes kdserve, kdmodels, teacher_server and
student_workers; the scripts are thin command lines over it, and it imports neither script.

Importing it sets the environment defaults of a job's driver (below) before Ray starts.
"""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default),
# which is what one ray.train.report costs; 0.2 s keeps reports cheap.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
