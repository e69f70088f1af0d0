"""The Ray Train job on the student side: job config and checks, the worker loop and its parts,
checkpoints, the run dir layout, aborts and fault drills."""
