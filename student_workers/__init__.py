"""Student-side workers of kdserve: training loops, losses and schedulers that run next to the student."""
