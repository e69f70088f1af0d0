"""Placement by node kind and replicas that follow demand, checked without a cluster: the Serve
deployment's options, and the one-line error for a placement no node can satisfy (nodes written
out by hand in ``ray.nodes()``'s shape)."""
from __future__ import annotations

import pytest

from kdserve import placement
from kdserve.config import ConfigError, build
from kdserve.teacher_config import TeacherConfig

pytestmark = pytest.mark.unit

FIELDS = {"CPU": "serve.num_cpus", "GPU": "serve.num_gpus", "resources": "serve.resources",
          "accelerator_type": "serve.accelerator_type"}


def node(ip, **res):
    return {"Alive": True, "NodeManagerAddress": ip, "Resources": {"memory": 1e9, f"node:{ip}": 1.0, **res}}


HEAD = node("10.0.0.1", CPU=2.0)
TEACHER = node("10.0.0.2", CPU=4.0, GPU=1.0, teacher_node=1.0, **{"accelerator_type:L4": 1.0})
STUDENT = node("10.0.0.3", CPU=8.0, student_node=1.0)


def test_a_node_with_every_resource_satisfies():
    need = TeacherConfig(serve={"num_gpus": 1, "resources": {"teacher_node": 0.01},
                                "accelerator_type": "L4"}).serve.replica_resources()
    assert need == {"CPU": 1.0, "GPU": 1.0, "teacher_node": 0.01, "accelerator_type:L4": 0.001}
    assert placement.unsatisfiable(need, [HEAD, TEACHER, STUDENT], FIELDS) is None
    # totals, not the sum over nodes: 3 CPUs on two nodes of 2 do not make a 3-CPU node
    assert placement.unsatisfiable({"CPU": 3.0}, [HEAD, node("10.0.0.4", CPU=2.0)], FIELDS).startswith(
        "serve.num_cpus: no node of the cluster offers {CPU: 3}")


@pytest.mark.parametrize("serve,field", [
    ({"resources": {"teacher_node": 0.01}}, "serve.resources"),
    ({"accelerator_type": "H100"}, "serve.accelerator_type"),
    ({"num_gpus": 2}, "serve.num_gpus"),
])
def test_no_node_names_the_field_and_lists_the_nodes(serve, field):
    need = TeacherConfig(serve=serve).serve.replica_resources()
    why = placement.unsatisfiable(need, [HEAD, STUDENT], FIELDS)
    assert why.startswith(f"{field}: no node of the cluster offers") and "\n" not in why
    assert "10.0.0.1 {CPU: 2}" in why and "10.0.0.3 {CPU: 8, student_node: 1}" in why
    assert "memory:" not in why and "node:10" not in why  # what every node has is left out


def test_dead_nodes_do_not_count_and_the_check_can_be_skipped(monkeypatch):
    dead = {**TEACHER, "Alive": False}
    need = {"teacher_node": 1.0}
    assert placement.unsatisfiable(need, [HEAD, dead], FIELDS).startswith("serve.resources:")
    monkeypatch.setenv(placement.SKIP_ENV, "1")
    assert placement.unsatisfiable(need, [HEAD, dead], FIELDS) is None


def test_serve_deployment_carries_placement_and_autoscaling():
    from teacher_server.serve_app import _deployment

    cfg = TeacherConfig(serve={"autoscaling": {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 4},
                               "resources": {"teacher_node": 0.01}, "accelerator_type": "L4", "num_cpus": 0.5})
    d = _deployment(cfg)
    assert d.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.0, "resources": {"teacher_node": 0.01},
                                   "accelerator_type": "L4"}
    a = d._deployment_config.autoscaling_config
    assert (a.min_replicas, a.max_replicas, a.target_ongoing_requests) == (0, 3, 4)
    assert (a.upscale_delay_s, a.downscale_delay_s) == (10.0, 60.0)
    fixed = _deployment(TeacherConfig(serve={"num_replicas": 2}))
    assert fixed.num_replicas == 2 and fixed._deployment_config.autoscaling_config is None


def test_autoscaling_bounds_are_checked():
    with pytest.raises(ConfigError, match=r"serve\.autoscaling\.max_replicas: .*under min_replicas"):
        build(TeacherConfig, {"serve": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})
    with pytest.raises(ConfigError, match=r"serve\.autoscaling: .*either num_replicas .* or autoscaling"):
        build(TeacherConfig, {"serve": {"num_replicas": 2, "autoscaling": {"max_replicas": 4}}})


def test_train_workers_ask_for_their_node_kind():
    from student_workers.train.job_config import JobConfig

    cfg = build(JobConfig, {"train": {"cpus_per_worker": 2, "use_gpu": True, "accelerator_type": "L4",
                                      "resources_per_worker": {"student_node": 0.01}}})
    need = cfg.train.worker_resources()
    assert need == {"CPU": 2.0, "GPU": 1.0, "student_node": 0.01, "accelerator_type:L4": 0.001}
    fields = {"CPU": "train.cpus_per_worker", "GPU": "train.use_gpu", "resources": "train.resources_per_worker",
              "accelerator_type": "train.accelerator_type"}
    # the student node has CPUs but no GPU and no L4: the two fields that ask for them are named
    why = placement.unsatisfiable(need, [HEAD, STUDENT], fields)
    assert why.startswith("train.accelerator_type and train.use_gpu: no node of the cluster offers")
    cpu_only = build(JobConfig, {"train": {"resources_per_worker": {"student_node": 0.01}}}).train.worker_resources()
    assert placement.unsatisfiable(cpu_only, [HEAD, TEACHER, STUDENT], fields) is None
