"""A job with several teachers, on the driver: every teacher checked before any cluster starts (its
address answers Describe, or its local config builds), every loss term against the teacher whose
targets it uses, and the local teachers deployed as applications of ONE Ray Serve instance (one
gRPC proxy, routed by application name = teacher name), each with its own replicas, fair-sharing
queue and caps (its ``local.sharing``)."""
from __future__ import annotations

from kdserve.config import ConfigError
from kdserve.errors import one_line
from student_workers.train.several import check_terms, field, local_teachers


def teacher_infos(cfg) -> dict:
    """{name: TeacherInfo} of every teacher: Describe of a running one, or built from its local config."""
    return {name: teacher_info(cfg, name, t) for name, t in cfg.all_teachers().items()}


def teacher_info(cfg, name: str, t):
    """Teacher ``name``'s TeacherInfo: from its store's manifest when the store stands in for it, the
    Describe of its address, or built from its local config."""
    from kdjob.teacher import describe
    from teacher_server.validate import describe_config

    from kdjob.targets import store_info

    where = field(cfg, name)
    if t.reads_store_only:  # the store's manifest describes its teacher; none is contacted
        return store_info(cfg, t, where)
    if t.address:
        try:
            return describe(t.address, cfg, t)
        except ValueError as e:  # an address no transport takes (scheme, path, TLS options)
            raise ConfigError(f"{where}.address: {one_line(e)}") from None
    return describe_config(t.local, f"{where}.local")


def one_teacher(cfg, name: str):
    """The job as teacher ``name`` alone sees it, a one-teacher JobConfig: that teacher as ``teacher:``,
    its own loss terms as distill's (no task term), and the raw texts sent (``data.teacher_text``, its
    pooled embedding) where it tokenizes with its own tokenizer. Its requests are the ones the
    several-teacher job sends that teacher, so a store filled for it is the one the job reads
    (``teachers.<name>.store``). ConfigError naming the field for an unknown name."""
    from kdserve.config import build
    from student_workers.train.job_config import JobConfig
    from student_workers.train.several import data_tokenizer_fingerprint, sends_texts, translated_fingerprint

    teachers = cfg.all_teachers()
    if name not in teachers:
        raise ConfigError(f"--teacher: {name!r} is not a teacher of this job (its teachers: {', '.join(teachers)})")
    if not cfg.teachers:
        return cfg
    t = teachers[name]
    if t.store is None:
        raise ConfigError(f"{field(cfg, name)}.store: no target store to fill for teacher {name!r}: name its URI "
                          f"(--set {field(cfg, name)}.store=DIR)")
    probe = t.model_copy(update={"store_mode": "write"})  # its own teacher is described, not a store it may not have yet
    info = teacher_info(cfg, name, probe)
    texts = sends_texts(info, data_tokenizer_fingerprint(cfg), translated_fingerprint(cfg))
    d = cfg.model_dump()
    d["teacher"], d["teachers"] = {**t.model_dump(), "name": name}, {}
    d["distill"] = {**cfg.distill.terms_of(name, cfg.teacher_name).model_dump(), "task_weight": 0.0, "teachers": {}}
    if texts:
        d["data"]["teacher_text"] = True
        d["distill"]["embedding_target"] = "pooled"
    return build(JobConfig, d, f"teacher {name!r} alone")


def check_job(cfg):
    """Everything the user typed, checked on the driver before any cluster starts (one teacher:
    ``kdjob.teacher.check_job``); the default teacher's TeacherInfo, or ConfigError naming the field."""
    from kdjob.teacher import check_job as check_one

    return check_several(cfg) if cfg.teachers else check_one(cfg)


def check_several(cfg):
    """``check_job`` for several teachers: the default teacher's TeacherInfo, after every check."""
    from student_workers.train.check import check_student_side

    infos = teacher_infos(cfg)
    local = local_teachers(cfg)
    if local:
        shared_token(cfg, local)
    texts = check_terms(cfg, infos)
    distiller = check_student_side(cfg, infos[cfg.teacher_name], infos, texts)
    check_stores(cfg, infos, distiller)
    return infos[cfg.teacher_name]


def check_stores(cfg, infos: dict, distiller) -> None:
    """Each teacher's store against that teacher and the spec its loss terms request (ConfigError naming
    ``teachers.<name>.store``); a store read in place of a teacher cannot replay augmented views here."""
    from kdjob.targets import check_store
    from student_workers.train.batches import replays_views

    for name, t in cfg.all_teachers().items():
        if t.store is None:
            continue
        where = field(cfg, name)
        if t.reads_store_only and replays_views(cfg):
            raise ConfigError(f"{where}.store_mode: read replays one store's augmented views, which several teachers "
                              "cannot share; use read_through (the store answers what it holds)")
        check_store(cfg, infos[name], distiller.heads[name].target_spec(t.target_dtype), t, where)


def shared_token(cfg, local: dict) -> str:
    """The one token of the job's Serve instance: the local teachers' token files must agree."""
    from kdjob.teacher import job_token

    tokens = {name: job_token(cfg, t) for name, t in local.items()
              if t.local.serve.auth_token_file or t.auth_token_file}
    if len(set(tokens.values())) > 1:
        a, b = list(tokens)[:2]
        raise ConfigError(f"{field(cfg, b)}.local.serve.auth_token_file: the local teachers {a} and {b} hold "
                          "different tokens; they share one Serve instance and one token: point them at one file")
    first = next(iter(tokens), next(iter(local)))
    return job_token(cfg, local[first])


def deploy_teachers(cfg) -> dict[str, str]:
    """{name: address} of every teacher; the local ones deployed first, in one Serve instance on the
    first local teacher's grpc_port (``grpc://host:port/<name>``)."""
    from kdjob.teacher import check_port_free, deploy_local, quiet_serve

    local = local_teachers(cfg)
    addresses = {n: t.address or t.store for n, t in cfg.all_teachers().items() if t.address or t.reads_store_only}
    if local:
        first = next(iter(local.values()))
        quiet_serve()
        check_port_free(first.host, first.grpc_port)
        token = shared_token(cfg, local)
        for i, (name, t) in enumerate(local.items()):
            print(f"deploying the local teacher {name} ({t.local.model}) on Ray Serve (gRPC :{first.grpc_port}, "
                  f"application {name})...", flush=True)
            section = t.model_copy(update={"grpc_port": first.grpc_port, "host": first.host})
            addresses[name] = deploy_local(cfg, section, token, name=name, field=field(cfg, name), start=i == 0)
    return {n: addresses[n] for n in cfg.all_teachers()}


def several_teachers(cfg, run_dir):
    """(default teacher's address, its TeacherInfo, {name: address}), every teacher deployed and described."""
    from kdjob.teacher import describe

    from kdjob.targets import store_info

    addresses = deploy_teachers(cfg)
    infos = {}
    for name, t in cfg.all_teachers().items():
        if t.reads_store_only:
            infos[name] = store_info(cfg, t, field(cfg, name))
            print(f"teacher {name}: {infos[name].model_name} from store {t.store} (mode read, no teacher; "
                  f"fingerprint {infos[name].fingerprint})", flush=True)
            continue
        infos[name] = describe(addresses[name], cfg, t)
        print(f"teacher {name}: {infos[name].model_name} at {addresses[name]} (fingerprint "
              f"{infos[name].fingerprint})", flush=True)
    print(f"run dir {run_dir}", flush=True)
    return addresses[cfg.teacher_name], infos[cfg.teacher_name], addresses
