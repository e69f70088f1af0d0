"""Several teachers for one student: the checks of `teachers:` and `distill.teachers` that need no
teacher (names, which terms use which teacher, one Serve instance for the local ones), and which
teachers are sent raw texts instead of the student's tokens.

`teacher:` is the default teacher (named `teacher.name`, else `teacher`): distill's own term fields
use its targets. `teachers: {name: TeacherSection}` adds others; `distill.teachers: {name: terms}`
names the terms that use each one's targets. The local teachers (no address) of a job run as
applications of one Ray Serve instance: one gRPC proxy on the first local teacher's port, routed by
application name (the teacher's name).
"""
from __future__ import annotations

import re
from urllib.parse import urlparse

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # a Serve application name and a term suffix
LOOPBACK = ("127.0.0.1", "localhost", "0.0.0.0", "::1", "::")
WEIGHTS = ("feature_weight", "data2vec_weight", "logits_weight", "embedding_weight", "attention_weight", "nce_weight")


def uses(terms) -> bool:
    """Whether a terms section has any term on its teacher's targets."""
    return any(getattr(terms, w) > 0 for w in WEIGHTS)


def check_teachers(cfg) -> None:
    """ValueError naming the field for the first problem of a job's teachers (none for one teacher)."""
    default = cfg.teacher_name
    if not NAME.match(default):
        raise ValueError(f"teacher.name: {default!r} is not a name (letters, digits, '_' or '-', at most 64)")
    for name, t in cfg.teachers.items():
        if name == default:
            raise ValueError(f"teachers.{name}: {name!r} is already the name of `teacher:` (teacher.name); "
                             "pick another name")
        if not NAME.match(name):
            raise ValueError(f"teachers.{name}: {name!r} is not a name (letters, digits, '_' or '-', at most 64)")
        if t.name not in (None, name):
            raise ValueError(f"teachers.{name}.name: {t.name!r}; under `teachers:` the key is the name: leave it empty")
    for name in cfg.distill.teachers:
        if name == default:
            raise ValueError(f"distill.teachers.{name}: {name!r} is the default teacher (teacher:), whose terms "
                             "are distill's own fields (distill.embedding_weight, ...)")
        if name not in cfg.teachers:
            known = ", ".join([f"{default} (teacher:)", *cfg.teachers]) if cfg.teachers else f"{default} (teacher:) only"
            raise ValueError(f"distill.teachers.{name}: unknown teacher {name!r}; the job's teachers: {known}")
    if not cfg.teachers:
        return
    unused = [n for n in cfg.teachers if n not in cfg.distill.teachers or not uses(cfg.distill.teachers[n])]
    if unused:
        raise ValueError(f"teachers.{unused[0]}: no loss term uses its targets; give it one in "
                         f"distill.teachers.{unused[0]} (e.g. embedding_weight: 1.0)")
    if not uses(cfg.distill):
        raise ValueError(f"teacher: no loss term uses the targets of {default!r} (every distill.*_weight on it is "
                         "0); make one of the others `teacher:` instead")
    _check_features(cfg)
    check_ports(cfg)


def _check_features(cfg) -> None:
    """What several teachers do not combine with (yet): OPTIMA's per-round spec. (A store read in place of
    a teacher on augmented images is refused on the driver: kdjob.several.check_stores.)"""
    if cfg.distill.optima.enabled:
        raise ValueError("distill.optima.enabled: not with several teachers (the bandit plays one teacher's modules)")


def field(cfg, name: str) -> str:
    """The config path of teacher ``name``'s section."""
    return "teacher" if name == cfg.teacher_name else f"teachers.{name}"


def local_teachers(cfg) -> dict:
    """{name: section} of the teachers the job deploys itself (no address, and not read from a store in
    place of a teacher), in config order."""
    return {n: t for n, t in cfg.all_teachers().items() if t.address is None and not t.reads_store_only}


def serve_endpoint(cfg) -> tuple[str, int] | None:
    """(host, gRPC port) of the job's Serve instance: the first local teacher's; None without one."""
    local = list(local_teachers(cfg).values())
    return (local[0].host, local[0].grpc_port) if local else None


def check_ports(cfg) -> None:
    """The local teachers share one Serve gRPC proxy (one port), and no teacher's address is that port."""
    local = local_teachers(cfg)
    endpoint = serve_endpoint(cfg)
    if endpoint is None:
        return
    host, port = endpoint
    first = next(iter(local))
    for name, t in list(local.items())[1:]:
        for key, own, shared in (("grpc_port", t.grpc_port, port), ("host", t.host, host)):
            if key in t.model_fields_set and own != shared:
                raise ValueError(
                    f"{field(cfg, name)}.{key}: {own!r}, but the job's local teachers are applications of one Ray "
                    f"Serve instance, one gRPC proxy on {field(cfg, first)}.{key} {shared!r} routed by teacher name: "
                    f"leave {field(cfg, name)}.{key} unset")
        if name in cfg.teachers:  # written out, so the config the workers (and config.yaml) get says it
            cfg.teachers[name] = t.model_copy(update={"grpc_port": port, "host": host})
    for name, t in cfg.all_teachers().items():
        if t.address is None:
            continue
        u = urlparse(t.address)
        try:
            same = u.port in (port, port + 1) and (u.hostname or "") in (*LOOPBACK, host)
        except ValueError:  # the address's own check (kdjob) names what is wrong with it
            continue
        if same:
            raise ValueError(f"{field(cfg, name)}.address: {t.address} is on the port ({port}, and {port + 1} for "
                             f"HTTP) where this job deploys its local teacher(s) ({field(cfg, first)}.grpc_port); "
                             "two teachers on one port would share it: pick another grpc_port")


def _fp(info) -> str:
    return info.tokenizer.fingerprint if info.HasField("tokenizer") else ""


def sends_texts(info, data_tokenizer_fingerprint: str | None, translated_fingerprint: str | None = None) -> bool:
    """A teacher with its own tokenizer that is not the one the student's batches are tokenized with
    (nor data.teacher_tokenizer, whose ids the batches also carry) gets the raw texts (the teacher
    tokenizes them) and serves pooled embeddings and logits only."""
    fp = _fp(info)
    return bool(fp) and data_tokenizer_fingerprint is not None and fp not in (data_tokenizer_fingerprint,
                                                                             translated_fingerprint)


def translates(info, data_tokenizer_fingerprint: str | None, translated_fingerprint: str | None) -> bool:
    """Whether a teacher is sent the student's tokens in its own ids (its tokenizer is data.teacher_tokenizer)."""
    fp = _fp(info)
    return bool(fp) and translated_fingerprint is not None and fp == translated_fingerprint != data_tokenizer_fingerprint


def data_tokenizer_fingerprint(cfg) -> str | None:
    """kdserve.tokenizer.fingerprint of data.tokenizer for a text student; None for others."""
    if cfg.student.kind != "hf_text":
        return None
    from kdserve import tokenizer
    from student_workers.data.tokenizer import load_tokenizer

    return tokenizer.fingerprint(load_tokenizer(cfg.data.tokenizer))


def translated_fingerprint(cfg) -> str | None:
    """kdserve.tokenizer.fingerprint of data.teacher_tokenizer; None without one."""
    if cfg.student.kind != "hf_text" or cfg.data.teacher_tokenizer is None:
        return None
    from kdserve import tokenizer
    from kdserve.config import ConfigError
    from student_workers.data.tokenizer import load_tokenizer

    try:
        return tokenizer.fingerprint(load_tokenizer(cfg.data.teacher_tokenizer))
    except (OSError, ValueError) as e:  # no such name or dir: transformers' long message, cut to its first line
        raise ConfigError(f"data.teacher_tokenizer: {cfg.data.teacher_tokenizer!r} is no tokenizer here (minilm, mpnet "
                          f"or a local Hugging Face dir): {str(e).splitlines()[0][:120]}") from None


def cannot_serve(cfg, name: str, info, texts: bool) -> str | None:
    """One line naming the term field whose targets teacher ``name`` cannot serve, else None."""
    terms = cfg.distill if name == cfg.teacher_name else cfg.distill.teachers[name]
    where = "distill" if name == cfg.teacher_name else f"distill.teachers.{name}"
    if texts and terms.token_level():
        t = info.tokenizer
        return (f"{where}.{terms.token_level()[0]}: teacher {name!r} tokenizes with its own tokenizer ({t.name}, "
                f"{t.fingerprint}), not data.tokenizer {cfg.data.tokenizer!r}, so it is sent the texts and serves "
                "no token-level targets: use its pooled sentence embedding (embedding_weight) or logits_weight")
    return None


def check_terms(cfg, infos: dict) -> dict[str, bool]:
    """{name: sent texts}; ConfigError naming the first term whose targets its teacher cannot serve."""
    from kdserve.config import ConfigError

    data_fp, tr_fp = data_tokenizer_fingerprint(cfg), translated_fingerprint(cfg)
    texts = {name: sends_texts(info, data_fp, tr_fp) for name, info in infos.items()}
    if tr_fp is not None:
        check_translation(cfg, tr_fp, infos)
    for name, info in infos.items():
        why = cannot_serve(cfg, name, info, texts[name])
        if why:
            raise ConfigError(why)
    return texts


def check_translation(cfg, tr_fp: str, infos: dict) -> None:
    """ConfigError unless data.teacher_tokenizer is a teacher's and the student's tokens translate into it,
    checked on the probe texts and the data's first 64 texts."""
    from kdserve.config import ConfigError
    from student_workers.data.build import build_dataset
    from student_workers.data.text import texts_of
    from student_workers.data.tokenizer import id_translation, load_tokenizer

    where = f"data.teacher_tokenizer: {cfg.data.teacher_tokenizer!r}"
    if not any(_fp(info) == tr_fp for info in infos.values()):
        have = ", ".join(f"{n}: {i.tokenizer.name or '-'} ({_fp(i) or 'none'})" for n, i in infos.items())
        raise ConfigError(f"{where} ({tr_fp}) is no teacher's tokenizer (the job's teachers: {have})")
    ds = build_dataset(cfg.data.dataset, **cfg.data.kwargs)
    sample = [t for i in range(min(64, len(ds))) for t in texts_of(ds[i])]
    try:
        id_translation(load_tokenizer(cfg.data.tokenizer), load_tokenizer(cfg.data.teacher_tokenizer), sample)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
