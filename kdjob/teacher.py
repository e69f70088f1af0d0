"""The teacher a job distills from: the configured one, or a local one deployed on Ray Serve
behind a bearer token; and the checks of a job against it before any cluster starts."""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from kdjob.cluster import SESSION
from kdserve.errors import one_line


def check_job(cfg):
    """Everything the user typed, checked on the driver before any cluster starts.

    Returns the teacher's TeacherInfo (from the running teacher, built from ``teacher.local`` on
    the meta device, or, in store mode read, from the store's manifest) and raises ``ConfigError`` with one line naming the field to fix.
    """
    from student_workers.train.check import check_student_side

    if cfg.teachers:
        raise ValueError("several teachers: check the job with kdjob.several.check_job")
    if cfg.teacher.reads_store_only:  # every target from the store: no teacher is contacted
        from kdjob.targets import check_store, check_views, store_info

        info = store_info(cfg)
        check_store(cfg, info, check_student_side(cfg, info).target_spec(cfg.teacher.target_dtype))
        check_views(cfg)
        return info
    if cfg.teacher.address:  # fail fast, before starting a cluster, when the teacher is not there
        from kdserve.config import ConfigError

        try:
            info = describe(cfg.teacher.address, cfg)
        except ValueError as e:  # an address no transport takes (scheme, path, TLS options)
            raise ConfigError(f"teacher.address: {one_line(e)}") from None
    else:
        from teacher_server.validate import describe_config

        job_token(cfg)  # an unreadable token file costs seconds, not a cluster start
        info = describe_config(cfg.teacher.local, "teacher.local")
    from student_workers.train.several import check_terms

    texts = check_terms(cfg, {cfg.teacher_name: info})
    distiller = check_student_side(cfg, info, texts=texts)
    if cfg.teacher.store:
        from kdjob.targets import check_store

        check_store(cfg, info, distiller.target_spec(cfg.teacher.target_dtype))
    return info


def job_token(cfg, section=None) -> str:
    """The bearer token of the embedded teacher: the user's own (``teacher.local.serve.auth_token_file``,
    else ``teacher.auth_token_file``, else ``$KDSERVE_AUTH_TOKEN``), else a new random one.

    Ray Serve's gRPC proxy binds every interface whatever ``teacher.host`` says, so a teacher without
    a token would serve anyone who reaches the port. The two files must agree: the replicas check
    the first, the students send the second.
    """
    from kdserve import auth
    from kdserve.config import ConfigError

    found = {}
    t = section or cfg.teacher
    for field, path in (("teacher.local.serve.auth_token_file", t.local.serve.auth_token_file),
                        ("teacher.auth_token_file", t.auth_token_file)):
        if path:
            try:
                found[field] = auth.load_token(path)
            except auth.AuthError as e:
                raise ConfigError(f"{field}: {e}") from None
    if len(set(found.values())) > 1:
        raise ConfigError("teacher.auth_token_file and teacher.local.serve.auth_token_file hold different tokens: "
                          "the local teacher would refuse the students; point both at the same file")
    return next(iter(found.values()), None) or auth.load_token() or secrets.token_urlsafe(32)


def private_token_file(token: str) -> str:
    """The token in a file only this user reads (0600 in a 0700 directory), removed at exit."""
    import tempfile

    d = tempfile.mkdtemp(prefix="kdserve-token-")
    SESSION.private_dirs.append(d)
    path = os.path.join(d, "token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return path


def check_port_free(host: str, port: int) -> None:
    """gRPC servers (the Serve proxy too) bind with SO_REUSEPORT: a second teacher on a busy port
    would silently share it with the first, and students would get either one's targets. The probe
    binds with SO_REUSEADDR, as the server will: a listener still refuses it, while the TIME_WAIT
    connections a teacher that just stopped leaves on its port (about 60 s) do not."""
    import socket

    from kdserve.config import ConfigError

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise ConfigError(f"teacher.grpc_port: port {port} on {host} is in use (another teacher?); "
                              f"pick another with --set teacher.grpc_port=...") from None


def quiet_serve() -> None:
    """Serve's "Started Serve", "Application ready", ... off the job's output. ``import ray.serve``
    sets its logger to INFO (ray/serve/__init__.py), so it comes before the level."""
    import ray.serve  # noqa: F401

    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def teacher_address(cfg) -> str:
    """The configured teacher, or a local one deployed on Ray Serve in this cluster.

    The local one requires ``job_token(cfg)``. This driver's clients read it from
    ``$KDSERVE_AUTH_TOKEN`` of this process, and ``fit`` hands that to the workers through Ray's
    object store. The replicas read the user's ``teacher.local.serve.auth_token_file``, else, in a
    cluster this job started (one node, this machine), a private file; else (a cluster joined, whose
    nodes may not see this machine's files) ``$KDSERVE_AUTH_TOKEN`` in their runtime_env, which Ray
    writes to its runtime_env_agent.log on the node. Never printed, never in the run's config.yaml.
    """
    if cfg.teacher.address:
        return cfg.teacher.address
    quiet_serve()
    check_port_free(cfg.teacher.host, cfg.teacher.grpc_port)
    print(f"deploying the local teacher {cfg.teacher.local.model} on Ray Serve (gRPC :{cfg.teacher.grpc_port})...",
          flush=True)
    return deploy_local(cfg, cfg.teacher, job_token(cfg))


def deploy_local(cfg, section, token: str, name: str | None = None, field: str = "teacher",
                 start: bool = True) -> str:
    """Deploy ``section.local`` on Ray Serve (gRPC on ``section.grpc_port``) behind ``token``; its address.
    ``name``: the Serve application's (several teachers: routed by it, ``grpc://host:port/<name>``)."""
    import ray

    from kdserve import auth
    from teacher_server.serve_app import APP_NAME, deploy

    host = section.host
    os.environ[auth.ENV_VAR] = token  # describe(), evaluate() and fit() of this driver read it
    local, replica_env_token = section.local, None
    if local.serve.auth_token_file:  # the replicas run in other processes (other directories)
        local = local.updated("serve", auth_token_file=str(Path(local.serve.auth_token_file).resolve()))
    elif SESSION.own_cluster:
        local = local.updated("serve", auth_token_file=private_token_file(token))
    else:
        replica_env_token = token
    if local.serve.direct_host == "127.0.0.1":  # the default: the replicas' endpoints as reachable as the proxy
        local = local.updated("serve", direct_host=host)
    deploy(local, grpc_port=section.grpc_port, http_port=section.grpc_port + 1, host=host,
           auth_token=replica_env_token, field_prefix=f"{field}.local.", name=name or APP_NAME,
           route_prefix=f"/{name}" if name else "/", start=start)
    SESSION.deployed_teacher = True
    reach = host if host not in ("0.0.0.0", "::") else ray.util.get_node_ip_address()
    return f"grpc://{reach}:{section.grpc_port}" + (f"/{name}" if name else "")


def describe(address: str, cfg, section=None):
    from student_workers.train.teacher import teacher_client

    # Before any cluster starts a missing teacher should cost seconds, not the whole retry budget.
    t = section or cfg.teacher
    with teacher_client(cfg, address, cfg.run.name, t, timeout=min(30.0, t.timeout_s),
                        retry_budget_s=min(15.0, t.retry_budget_s)) as c:
        return c.describe()
