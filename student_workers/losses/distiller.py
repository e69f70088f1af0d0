"""The distillation head: what to ask the teacher for, and the combined KD loss of a step.

``Distiller`` owns every stateful piece on the student's side of the losses: the projections
``W: D_s -> D_t`` (they belong to distillation and are dropped afterwards) and the NCE teacher
queues, so one ``state_dict`` (and so every checkpoint) carries them with the student.

Modules: a unimodal student has one module ("vision" or "text"); a CoCa-style student has
"image", "text" and "multimodal". Layer maps, projections, attention and NCE terms are per
module; ``arm`` (OPTIMA, docs/methods.md#optima) restricts the layerwise terms to some modules.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdserve import registry, wire
from kdserve.v1 import teacher_pb2 as pb
from student_workers.losses import (
    NeighbourBank,
    Projection,
    TeacherQueue,
    data2vec_loss,
    feature_loss,
    gather_rows,
    masked_mean_pool,
    listwise_kl,
    relational_kl,
    token_nce,
)
from student_workers.losses.teacher_targets import need_target, student_attention, target_like, teacher_width
from student_workers.losses.layer_map import layer_map
from student_workers.train.job_config import DistillSection


@dataclass
class ModuleView:
    """One module of a student forward: block outputs, attention maps, real-token mask."""

    hidden: list[torch.Tensor]  # L x (B, T, D)
    attentions: list[torch.Tensor | None] | None  # L x (B, H, T, T)
    mask: torch.Tensor | None  # (B, T)


def module_views(out) -> dict[str, ModuleView]:
    """StudentOutput (one module) or a multi-module output -> {module: ModuleView}."""
    if isinstance(out.hidden, dict):
        attn = out.attentions or {}
        masks = getattr(out, "token_masks", None) or {}
        return {m: ModuleView(h, attn.get(m), masks.get(m)) for m, h in out.hidden.items()}
    return {"": ModuleView(out.hidden, out.attentions, out.token_mask)}


def data2vec_layers(num_teacher_layers: int, top_k: int) -> list[int]:
    """The teacher blocks of the Data2Vec target: the top ``top_k`` (1-based), or [] (all) for 0."""
    if top_k > num_teacher_layers:
        raise ValueError(f"distill.data2vec_top_k: {top_k} blocks, but the teacher has {num_teacher_layers}")
    return list(range(num_teacher_layers - top_k + 1, num_teacher_layers + 1)) if top_k else []


class Distiller(nn.Module):
    """Student + distillation heads. ``forward(inputs, targets, labels, arm) -> (total, terms)``."""

    def __init__(self, student: nn.Module, cfg: DistillSection, info: pb.TeacherInfo):
        super().__init__()
        self.student = student
        self.cfg = cfg
        teacher = {m.name: m for m in info.modules}
        self.student_modules = dict(student.modules_info)  # name -> (L, D, H)
        missing = sorted(set(self.student_modules) - set(teacher))
        if missing:
            raise ValueError(f"the student has modules {missing} that the teacher lacks (teacher: {sorted(teacher)})")
        unknown = [m for m in cfg.modules if m not in self.student_modules]
        if unknown:
            raise ValueError(f"distill.modules: unknown module(s) {unknown}; the student has {sorted(self.student_modules)}")
        self.modules_ = [m for m in self.student_modules if not cfg.modules or m in cfg.modules]
        self.teacher_info = {m: teacher[m] for m in self.modules_}
        self.pairs: dict[str, list[tuple[int, int]]] = {}
        self.proj = nn.ModuleDict()
        self.nce_proj = nn.ModuleDict()
        self.queues = nn.ModuleDict()
        self.d2v_proj = nn.ModuleDict()
        self.emb_proj = nn.ModuleDict()
        self.emb_banks = nn.ModuleDict()
        # Attention terms only where both sides have attention maps (a CNN module has none).
        self.attention_modules = [m for m in self.modules_ if cfg.attention_weight > 0
                                  and self.student_modules[m][2] > 0 and self.teacher_info[m].num_heads > 0]
        for m in self.modules_:
            self._add_heads(m, cfg)
        if cfg.data2vec_weight > 0 and (cfg.feature_weight > 0 or cfg.nce_weight > 0 or cfg.embedding_weight > 0):
            raise ValueError(
                "distill: data2vec_weight > 0 together with feature_weight, nce_weight or embedding_weight; one request carries "
                "one hidden reduction, so use Data2Vec alone (set the others to 0)"
            )
        if cfg.logits_weight > 0 and cfg.logits_top_k and cfg.logits_loss not in registry.names("logits_loss_topk"):
            raise ValueError(f"distill.logits_top_k needs a logits_loss with a top-k form "
                             f"({', '.join(registry.names('logits_loss_topk'))}), not {cfg.logits_loss!r}")
        if (cfg.logits_weight > 0) and info.num_classes == 0:
            raise ValueError("distill.logits_weight > 0 but the teacher has no classification head")
        self.pooled = cfg.embedding_weight > 0 and cfg.embedding_target == "pooled"  # DistillSection checks the rest
        if not any((cfg.feature_weight, cfg.data2vec_weight, cfg.logits_weight, cfg.attention_weight,
                    cfg.nce_weight, cfg.embedding_weight, cfg.task_weight)):
            raise ValueError("distill: every weight is 0; nothing to train")

    def _add_heads(self, m: str, cfg: DistillSection) -> None:
        """Module ``m``'s layer pairs and the stateful pieces its terms need: projections, NCE queue, bank."""
        l_s, d_s, h_s = self.student_modules[m]
        t = self.teacher_info[m]
        if cfg.feature_weight > 0 or cfg.attention_weight > 0:
            try:
                self.pairs[m] = layer_map(cfg.layer_map, l_s, t.num_layers, cfg.layer_pairs or None)
            except ValueError as e:
                raise ValueError(f"distill.layer_map for module {m!r} (teacher has {t.num_layers} blocks): {e}") from None
        if cfg.feature_weight > 0:
            for s, tl in self.pairs[m]:
                self.proj[f"{m}_{s}"] = Projection(self._student_width(m, s), teacher_width(t, tl))
        if m in self.attention_modules and cfg.attention_kind == "per_head" and h_s != t.num_heads:
            raise ValueError(
                f"distill.attention_kind=per_head needs equal head counts; module {m!r}: student {h_s}, "
                f"teacher {t.num_heads} (use attention_kind: head_mean)"
            )
        if cfg.nce_weight > 0:
            self.nce_proj[m] = Projection(d_s, t.hidden_size, force=True)
            self.queues[m] = TeacherQueue(t.hidden_size, cfg.nce_queue_size)
        if cfg.data2vec_weight > 0:
            self.d2v_proj[m] = Projection(d_s, t.hidden_size)
        if cfg.embedding_weight > 0 and cfg.embedding_loss == "pointwise":
            self.emb_proj[m] = Projection(d_s, t.hidden_size)
        if cfg.embedding_weight > 0 and cfg.embedding_bank_size:
            self.emb_banks[m] = NeighbourBank(d_s, t.hidden_size, cfg.embedding_bank_size)

    def _student_width(self, m: str, block: int) -> int:
        """Width of the student's block ``block``: per-block for students whose stages differ
        (CNNs expose ``layer_sizes``), else the module's hidden size."""
        sizes = getattr(self.student, "layer_sizes", {}).get(m)
        return int(sizes[block - 1]) if sizes else self.student_modules[m][1]

    # -- names -----------------------------------------------------------------------------
    @property
    def modules_list(self) -> list[str]:
        return list(self.modules_)

    @property
    def needs_teacher(self) -> bool:
        """False for the no-KD baseline (task loss only): no request is sent at all."""
        c = self.cfg
        return any((c.feature_weight, c.data2vec_weight, c.logits_weight, c.attention_weight, c.nce_weight,
                    c.embedding_weight))

    # -- what to request ---------------------------------------------------------------------
    def target_spec(self, dtype: str = "float32", arm: tuple[str, ...] | None = None) -> pb.TargetSpec:
        """Only what this step's losses need crosses the wire (``arm``: modules trained layerwise)."""
        c = self.cfg
        layerwise = [m for m in self.modules_ if arm is None or m in arm]
        hidden: dict[str, list[int]] = {}
        attention: dict[str, list[int]] = {}
        reduction = "mean" if self.pooled else "none"  # mean: the teacher's own sentence embedding, (B, D)
        for m in self.modules_:
            tm, t = m, self.teacher_info[m]
            if c.data2vec_weight > 0:  # [] = all teacher layers; reduced on the server
                hidden[tm], reduction = data2vec_layers(t.num_layers, c.data2vec_top_k), "data2vec"
                continue
            layers = set()
            if c.feature_weight > 0 and m in layerwise:
                layers |= {tl for _, tl in self.pairs[m]}
            if c.nce_weight > 0 or c.embedding_weight > 0:
                layers.add(t.num_layers)
            if layers:
                hidden[tm] = sorted(layers)
            if c.attention_weight > 0 and m in self.attention_modules and m in layerwise:
                attention[tm] = [t.num_layers] if c.attention_kind == "per_head" else sorted({tl for _, tl in self.pairs[m]})
        return wire.target_spec(
            hidden=hidden, hidden_reduction=reduction, data2vec_eps=c.data2vec_eps,
            attention=attention, attention_reduction="none" if c.attention_kind == "per_head" else "head_mean",
            logits=c.logits_weight > 0, logits_top_k=c.logits_top_k, dtype=dtype,
        )

    def attention_needed(self, arm: tuple[str, ...] | None = None):
        """Student blocks whose true attention probabilities this step needs, per module."""
        if self.cfg.attention_weight <= 0:
            return False
        need = {}
        for m in self.attention_modules:
            if arm is not None and m not in arm:
                continue
            l_s = self.student_modules[m][0]
            need[m] = {l_s} if self.cfg.attention_kind == "per_head" else {s for s, _ in self.pairs[m]}
        if len(self.student_modules) == 1:  # unimodal students take a set of blocks
            return next(iter(need.values()), set()) or False
        return need

    # -- the loss ----------------------------------------------------------------------------
    def forward(self, inputs, targets, labels=None, arm=None, enqueue: bool = True, measure: bool = False):
        """``measure``: an OPTIMA measurement step; every module's losses are computed (the
        attention of every module included) whatever ``arm`` trains, so the reward does not
        depend on the arm that was played (docs/methods.md#optima)."""
        out = self.student(inputs, need_attention=self.attention_needed(None if measure else arm))
        return self.losses(out, targets, labels, arm, enqueue, measure)

    def losses(self, out, targets, labels=None, arm=None, enqueue: bool = True, measure: bool = False):
        """(total, terms). ``total`` trains the student: the layerwise terms of the modules in
        ``arm`` (all modules when ``arm`` is None) plus the module-independent terms.

        ``terms`` (detached) holds every computed term: ``hid.<m>`` / ``attn.<m>`` per module,
        ``kd``, ``task``, ``nce.<m>``, ``data2vec.<m>``. When every module is computed (``arm`` is
        None, or ``measure``) it also holds the full-model sums ``hid`` and ``attn`` over all
        mapped layers: OPTIMA's reward signal. On a measurement step the modules outside ``arm``
        are evaluated without gradient; they do not enter ``total``.

        A target that a computed term needs and ``targets`` lacks is a ``ValueError`` naming the
        key: a skipped term would silently change both the objective and the reward.
        """
        views = module_views(out)
        if "" in views and len(self.modules_) == 1:
            views = {self.modules_[0]: views[""]}
        ref = next(iter(views.values())).hidden[-1]
        total = ref.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        sums = {"hid": ref.new_zeros(()), "attn": ref.new_zeros(())}  # over every module: the full model's
        for m, v in views.items():
            if m not in self.modules_:
                continue
            trains = arm is None or m in arm
            for key, weight, term in self._layerwise(m, v, targets, trains) if trains or measure else ():
                sums[key] = sums[key] + term.detach()
                terms[f"{key}.{m}"] = term.detach()
                if trains:
                    total = total + weight * term
            for key, weight, term in self._module_terms(m, v, targets, enqueue):
                total = total + weight * term
                terms[f"{key}.{m}"] = term.detach()
        for key, weight, term in self._output_terms(out, targets, labels):
            total = total + weight * term
            terms[key] = term.detach()
        if arm is None or measure:
            weights = {"hid": self.cfg.feature_weight, "attn": self.cfg.attention_weight}
            terms.update({k: s for k, s in sums.items() if weights[k] > 0})
        return total, terms

    def _layerwise(self, m, v: ModuleView, targets, trains: bool) -> list[tuple[str, float, torch.Tensor]]:
        """[(key, weight, term)]: the module's hidden-state and attention terms. Outside the arm a
        term is only measured: no graph, no gradient."""
        c, out = self.cfg, []
        with contextlib.nullcontext() if trains else torch.no_grad():
            if c.feature_weight > 0:
                hid = v.hidden[-1].new_zeros(())
                pooled = self.teacher_info[m].num_tokens == 1  # the teacher's states are pooled: pool the student's
                for s, t in self.pairs[m]:
                    h = masked_mean_pool(v.hidden[s - 1], v.mask).unsqueeze(1) if pooled else v.hidden[s - 1]
                    hid = hid + feature_loss(h, target_like(need_target(targets, f"hidden.{m}.{t}"), h), c.feature_kind,
                                             mask=None if pooled else v.mask, projection=self.proj[f"{m}_{s}"])
                out.append(("hid", c.feature_weight, hid))
            if c.attention_weight > 0 and m in self.attention_modules:
                out.append(("attn", c.attention_weight, self._attention(m, m, v, targets)))
        return out

    def _module_terms(self, m, v: ModuleView, targets, enqueue: bool) -> list[tuple[str, float, torch.Tensor]]:
        """[(key, weight, term)]: the module's terms that every step trains, whatever the arm."""
        c, out = self.cfg, []
        if c.nce_weight > 0:
            out.append(("nce", c.nce_weight, self._nce(m, m, v, targets, enqueue)))
        if c.embedding_weight > 0:
            out.append(("emb", c.embedding_weight, self._embedding(m, m, v, targets, enqueue)))
        if c.data2vec_weight > 0:
            out.append(("data2vec", c.data2vec_weight,
                        data2vec_loss(v.hidden, target_like(need_target(targets, f"data2vec.{m}"), v.hidden[-1]), eps=c.data2vec_eps,
                                      mask=v.mask, projection=self.d2v_proj[m])))
        return out

    def _output_terms(self, out, targets, labels) -> list[tuple[str, float, torch.Tensor]]:
        """[(key, weight, term)]: the logit KD and task terms, on the student's logits."""
        c, terms = self.cfg, []
        if c.logits_weight > 0 and out.logits is not None:
            terms.append(("kd", c.logits_weight, self._logits(out.logits, targets)))
        if c.task_weight > 0 and labels is not None and out.logits is not None:
            terms.append(("task", c.task_weight, F.cross_entropy(out.logits.float(), labels.to(out.logits.device))))
        return terms

    def _embedding(self, m, tm, v: ModuleView, targets, enqueue: bool = False):
        """The embedding a sentence encoder is used through: the masked mean of the last block's
        tokens (sentence-transformers' pooling), student (projected) vs teacher, by the configured
        distance (cosine by default: retrieval compares directions), or ``embedding_loss`` relational:
        their in-batch neighbour distributions (and the bank's, ``embedding_bank_size``, which a training
        step then extends with this batch of every rank). ``embedding_target`` pooled: the teacher pooled
        its own tokens already (a (B, D_t) target)."""
        key = f"{'pooled' if self.pooled else 'hidden'}.{tm}.{self.teacher_info[m].num_layers}"
        if self.pooled:
            teacher = target_like(need_target(targets, key), v.hidden[-1][:, 0])  # (B, D_t): pooled by the teacher
        else:
            teacher = masked_mean_pool(target_like(need_target(targets, key), v.hidden[-1]), v.mask)  # (B, D_t)
        if self.cfg.embedding_loss == "listwise":
            return listwise_kl(masked_mean_pool(v.hidden[-1], v.mask), teacher, self.cfg.embedding_tau)
        if self.cfg.embedding_loss == "relational":  # the student's own embedding, no projection
            student = masked_mean_pool(v.hidden[-1], v.mask)  # (B, D_s)
            if m not in self.emb_banks:
                return relational_kl(student, teacher, self.cfg.embedding_tau)
            bank = self.emb_banks[m]
            s_bank, t_bank = bank.banks()
            loss = relational_kl(student, teacher, self.cfg.embedding_tau, s_bank.to(student.device),
                                 t_bank.to(student.device))
            if enqueue and self.training:  # every rank's batch, so every rank holds the same bank (gather_rows)
                bank.enqueue(gather_rows(student.detach().float()), gather_rows(teacher.detach().float()))
            return loss
        student = masked_mean_pool(self.emb_proj[m](v.hidden[-1]), v.mask)  # (B, D_t)
        return feature_loss(student, teacher, self.cfg.embedding_kind)

    def _attention(self, m, tm, v: ModuleView, targets):
        c = self.cfg
        fn = registry.get("attention_loss", c.attention_kind)
        if c.attention_kind == "per_head":
            l_s = self.student_modules[m][0]
            key = f"attention.{tm}.{self.teacher_info[m].num_layers}"
            a = student_attention(v, m, l_s)
            return fn(a, target_like(need_target(targets, key), a), mask=v.mask)
        total = 0
        for s, t in self.pairs[m]:
            a = student_attention(v, m, s)
            total = total + fn(a, target_like(need_target(targets, f"attention.{tm}.{t}"), a[:, 0]), mask=v.mask)
        return total

    def _nce(self, m, tm, v: ModuleView, targets, enqueue: bool):
        t_last = self.teacher_info[m].num_layers
        teacher = target_like(need_target(targets, f"hidden.{tm}.{t_last}"), v.hidden[-1])  # (B, T, D_t)
        student = self.nce_proj[m](v.hidden[-1])  # (B, T, D_t)
        queue = self.queues[m]
        loss = token_nce(student, teacher, queue.negatives().to(student.device), tau=self.cfg.nce_tau,
                         mask=v.mask, mean_pooled=self.cfg.nce_mean_pooled)
        if enqueue and self.training:
            if self.cfg.nce_mean_pooled:
                rows = masked_mean_pool(teacher, v.mask)  # (B, D_t)
            else:
                rows = teacher.detach().reshape(-1, teacher.shape[-1])  # (B*T, D_t)
                if v.mask is not None:
                    rows = rows[v.mask.reshape(-1).bool()]  # (N, D_t): real tokens only
            queue.enqueue(gather_rows(rows))  # every rank's batch, so every rank holds the same queue
        return loss

    def _logits(self, logits, targets):
        c = self.cfg
        if c.logits_top_k:
            fn = registry.get("logits_loss_topk", c.logits_loss)
            return fn(logits, target_like(need_target(targets, "logits_topk.values"), logits),
                      need_target(targets, "logits_topk.indices").to(logits.device), temperature=c.temperature)
        fn = registry.get("logits_loss", c.logits_loss)
        kwargs = {"temperature": c.temperature} if "temperature" in inspect.signature(fn).parameters else {}
        return fn(logits, target_like(need_target(targets, "logits"), logits), **kwargs)
