"""TeacherConfig's sections: each frontend reads its own, and an option that the chosen frontend
would ignore is an error naming the field, found before anything starts (the CLI's exit 2, the
job config, run_server, the Serve app builder, the Triton repository writer)."""
from __future__ import annotations

import pytest

from kdserve.config import ConfigError, build
from kdserve.teacher_config import FRONTENDS, TeacherConfig

pytestmark = pytest.mark.unit

SECTIONS = ("sharing", "grpc", "serve", "triton")


def other_value(section: str, name: str):
    """A valid value for ``section.name`` that differs from its default, made from the default."""
    default = getattr(TeacherConfig(), section).model_dump()[name]
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 1
    if isinstance(default, dict):
        return {"exp-a": 2.0}
    if name == "scheduler":
        return "fifo"
    if name == "autoscaling":
        return {"max_replicas": 2}
    return "/var/run/secrets/kdserve/token"  # auth_token_file


def readers(section: str) -> set[str]:
    """The frontends that use ``section``, written out by hand from the frontends' code."""
    return {"sharing": {"grpc", "serve"}, "grpc": {"grpc"}, "serve": {"serve"}, "triton": {"triton"}}[section]


CASES = [(s, n) for s in SECTIONS for n in type(getattr(TeacherConfig(), s)).model_fields]


@pytest.mark.parametrize("section,name", CASES, ids=[f"{s}.{n}" for s, n in CASES])
def test_an_option_is_accepted_by_its_frontends_and_refused_by_the_others(section, name):
    cfg = TeacherConfig(**{section: {name: other_value(section, name)}})
    for frontend in FRONTENDS:
        if frontend in readers(section):
            assert cfg.check_frontend(frontend) is cfg
        else:
            with pytest.raises(ValueError, match=rf"^teacher\.local\.{section}\.{name} is an option of .* ignores it"):
                cfg.check_frontend(frontend, "teacher.local.")


def test_defaults_pass_every_frontend_and_survive_a_dump():
    for frontend in FRONTENDS:
        TeacherConfig().check_frontend(frontend)
    # a dumped config names every field; "set" means "not the default", so it still passes
    cfg = TeacherConfig(serve={"num_cpus": 0.5}, sharing={"cache_bytes": 1 << 20})
    again = TeacherConfig(**cfg.model_dump())
    assert again == cfg and again.check_frontend("serve") is again
    with pytest.raises(ValueError, match="unknown frontend"):
        cfg.check_frontend("http")


def test_updated_replaces_one_field_of_one_section_and_validates():
    cfg = TeacherConfig(serve={"num_cpus": 0.5})
    new = cfg.updated("serve", auth_token_file="/t")
    assert (new.serve.num_cpus, new.serve.auth_token_file, cfg.serve.auth_token_file) == (0.5, "/t", None)
    with pytest.raises(ValueError):
        cfg.updated("serve", num_replicas=0)


def test_flat_frontend_keys_are_unknown():
    """The sections are the only place for a frontend's options: the old flat keys are errors."""
    with pytest.raises(ConfigError, match=r"num_replicas: unknown key"):
        build(TeacherConfig, {"num_replicas": 2}, "teacher config")


def test_cli_names_the_field_before_anything_starts(capsys):
    from teacher_server.__main__ import main

    assert main(["--backend", "grpc", "--set", "serve.num_replicas=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: teacher config: serve.num_replicas is an option of Ray Serve") and "\n" not in err


def test_job_config_checks_the_embedded_teacher_against_serve():
    from student_workers.train.job_config import JobConfig

    with pytest.raises(ConfigError, match=r"teacher\.local\.grpc\.metrics_port is an option of the plain gRPC server"):
        build(JobConfig, {"teacher": {"local": {"grpc": {"metrics_port": 9100}}}})
    # a job that uses a running teacher deploys nothing: teacher.local is not read
    build(JobConfig, {"teacher": {"address": "grpc://h:9000", "local": {"grpc": {"metrics_port": 9100}}}})


def test_triton_repository_refuses_a_sharing_option(tmp_path):
    from teacher_server.triton.repository import write_repository

    cfg = TeacherConfig(model="synthetic:", sharing={"cache_bytes": 1 << 20})
    with pytest.raises(ValueError, match=r"^sharing\.cache_bytes .* Triton"):
        write_repository(cfg, tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything is written
