"""Whether a Ray cluster has a node for what an actor asks (teacher replicas, Train workers), said
in one line that names the config field to fix and what the nodes offer. Checked on the driver
before anything is deployed, since Ray itself would leave the actor pending without a word.

Pure functions over ``ray.nodes()``-shaped dicts; the caller reads the cluster."""
from __future__ import annotations

import os
from typing import Mapping

SKIP_ENV = "KDSERVE_SKIP_PLACEMENT_CHECK"  # an autoscaling cluster that will add the node later
_HIDDEN = ("node:", "memory", "object_store_memory")  # every node has them; they never decide here


def need(cpus: float, gpus: float, resources: Mapping[str, float], accelerator_type: str | None) -> dict[str, float]:
    """What one actor asks of a node, in the terms of ``ray.nodes()[i]["Resources"]`` (Ray gives a node
    with accelerator X the resource ``accelerator_type:X``; an actor that names X takes 0.001 of it)."""
    out = {"CPU": cpus, "GPU": gpus, **resources}
    if accelerator_type:
        out[f"accelerator_type:{accelerator_type}"] = 0.001
    return {k: v for k, v in out.items() if v > 0}


def _field(resource: str, fields: Mapping[str, str]) -> str:
    if resource.startswith("accelerator_type:"):
        return fields["accelerator_type"]
    return fields.get(resource, fields["resources"])


def _offer(node: Mapping) -> str:
    res = {k: v for k, v in node.get("Resources", {}).items() if not k.startswith(_HIDDEN)}
    return f"{node.get('NodeManagerAddress', '?')} {{{', '.join(f'{k}: {v:g}' for k, v in sorted(res.items()))}}}"


def unsatisfiable(need: Mapping[str, float], nodes: list[Mapping], fields: Mapping[str, str]) -> str | None:
    """None when some alive node offers every resource in ``need`` (its total, not what is free:
    busy resources free up); else one line naming the field to change.

    ``fields`` maps a resource to the config field that asks for it: "CPU", "GPU", and the keys
    "resources" (any custom resource) and "accelerator_type" (``accelerator_type:<X>`` resources).
    """
    alive = [n for n in nodes if n.get("Alive", True)]
    if not alive or os.environ.get(SKIP_ENV):
        return None
    missing = [[k for k, v in need.items() if n.get("Resources", {}).get(k, 0.0) < v] for n in alive]
    if any(not m for m in missing):
        return None
    closest = min(missing, key=len)
    names = sorted({_field(k, fields) for k in closest})
    asked = ", ".join(f"{k}: {need[k]:g}" for k in closest)
    return (f"{' and '.join(names)}: no node of the cluster offers {{{asked}}}; its nodes: "
            f"{'; '.join(_offer(n) for n in alive)} (a cluster whose autoscaler will add such a node: "
            f"set {SKIP_ENV}=1)")
