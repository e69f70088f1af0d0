"""Which modules each training step distills and measures under OPTIMA."""
from __future__ import annotations


class ArmPlan:
    """Which modules each step distills, which steps measure, and what each step's request asks
    for (OPTIMA, docs/methods.md#optima).

    A round is ``delta`` steps; its last ``measure`` steps are measurement steps, whose full-model
    losses (every module, whatever the arm) score the round. Requests leave ``depth`` steps ahead
    (the prefetch depth), so step ``t``'s request is built when only steps ``< t - depth`` have
    trained. The arm of a round is drawn after the round before it ends, which is too late for
    the first ``depth`` steps of the round: those, and the measurement steps, ask for every
    module's targets; every other step asks for exactly its arm's. The spec each step was
    requested for is remembered, and :meth:`step_args` refuses to train a step on targets made for
    another arm.
    """

    def __init__(self, scheduler, delta: int, measure: int, start: int, depth: int = 0):
        self.scheduler = scheduler
        self.delta, self.measure, self.next_step, self.depth = delta, measure, start, depth
        self.issued: dict[int, tuple[str, ...] | None] = {}  # step -> arm its request was made for (None: all)

    def is_measured(self, step: int) -> bool:
        return self.scheduler is not None and step % self.delta >= self.delta - self.measure

    def needs_full(self, step: int) -> bool:
        """Every module's targets: without OPTIMA, on measurement steps, and where the step's arm
        is not yet drawn when its request leaves."""
        return self.scheduler is None or self.is_measured(step) or step % self.delta < self.depth

    def arm(self) -> tuple[str, ...] | None:
        return None if self.scheduler is None else tuple(self.scheduler.current_arm())

    def arm_for_next(self) -> tuple[str, ...] | None:
        """The arm whose targets the next step's request asks for (None: every module's)."""
        step, self.next_step = self.next_step, self.next_step + 1
        arm = None if self.needs_full(step) else self.arm()
        self.issued[step] = arm
        return arm

    def step_args(self, step: int) -> tuple[tuple[str, ...] | None, bool]:
        """(arm, measure) that ``step`` trains with; raises if its targets were requested for another arm."""
        arm = self.arm()
        if step in self.issued:
            made_for = self.issued.pop(step)
            if made_for is not None and made_for != arm:
                raise RuntimeError(f"step {step} trains arm {arm} but its targets were requested for arm {made_for}")
        return arm, self.is_measured(step)

    def end_step(self, step: int, terms: dict) -> dict | None:
        """After a measurement step: the job-wide (rank-mean) full-model losses go to the bandit;
        at a round's end rank 0's decision is broadcast. Returns the round record, if one closed."""
        if not self.is_measured(step):
            return None
        from student_workers.optima.distributed import broadcast_state, reduce_losses

        missing = [k for k in self.scheduler.loss_keys if k not in terms]
        if missing:
            raise ValueError(f"measurement step {step} lacks the full-model loss(es) {missing} (have {sorted(terms)})")
        record = self.scheduler.step_end(reduce_losses({k: float(terms[k]) for k in self.scheduler.loss_keys},
                                                       self.scheduler.loss_keys))
        if record is not None:
            broadcast_state(self.scheduler, src=0)
        return record
