"""Offline validation of the Kubernetes manifests in k8s/ (no cluster, no kubectl, no kustomize).

- Built-in kinds: the ``kubernetes-validate`` package's JSON schemas, strict (unknown fields fail),
  Kubernetes ``K8S_VERSION``.
- KubeRay kinds (RayService, RayJob, RayCluster): the ``openAPIV3Schema`` of the KubeRay v1.7.0 CRDs
  in the directory ``$KDSERVE_KUBERAY_CRDS`` names (``.ci/run`` sets it; never copied into this repo), made strict the way the API
  server's strict field validation behaves: every object schema without
  ``x-kubernetes-preserve-unknown-fields`` or ``additionalProperties`` gets
  ``additionalProperties: false``. Their ``metadata`` and every embedded pod template are also
  checked against the built-in ObjectMeta / PodTemplate schemas. CEL rules
  (``x-kubernetes-validations``) are not evaluated.
- A kind with no schema is an error, and deliberately broken documents must fail.
- The CPU overlay is rendered with a tiny kustomize subset (resources, JSON6902 patches with a
  target, images) that refuses any other kustomization field, then validated the same way.
- Agreement with the code: the Serve config (import path, servicer, gRPC port, TeacherConfig args),
  the RayJob entrypoints and their JobConfig files, Service/NetworkPolicy/PDB selectors vs pod
  labels, ports, images vs the Dockerfile.
"""
from __future__ import annotations

import copy
import fnmatch
import functools
import importlib
import os
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CPU_OVERLAY = K8S / "overlays" / "cpu"
# The KubeRay CRDs are not this project's files: KDSERVE_KUBERAY_CRDS says where they are (.ci/run
# sets it when CI provides them); without it the tests that need them skip, saying so.
CRD_DIR = Path(os.environ.get("KDSERVE_KUBERAY_CRDS", "") or "/nonexistent/kuberay-crds")
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")
K8S_VERSION = "1.31"  # the Kubernetes version the built-in kinds are validated against
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KDSERVE_IMAGE = "kdserve:0.1.0-gpu"
KDSERVE_CPU_IMAGE = "kdserve:0.1.0-cpu"
TEACHER_SERVICE = "kdserve-teacher"
GPU = "nvidia.com/gpu"
THIRD_PARTY_IMAGES = ("nvcr.io/", "envoyproxy/envoy:")  # Triton's image, the TLS proxy
TLS_PROXY = "kdserve-teacher-tls"
TOKEN_SECRET = "kdserve-teacher-token"

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ManifestError(AssertionError):
    """A manifest that a cluster would reject (or that has no schema to check it against)."""


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml", ".json"))


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d is not None]


def doc_id(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def base_docs() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{doc_id(d)}", d) for p in manifest_files() for d in load_docs(p)]


BASE = base_docs()


def find(docs, kind: str, name: str | None = None) -> list[dict]:
    docs = [d[1] if isinstance(d, tuple) else d for d in docs]
    return [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind: str, name: str | None = None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''} in k8s/, found {len(found)}"
    return found[0]


# ------------------------------------------------------------------------------------------------
# Schemas and validation
# ------------------------------------------------------------------------------------------------


def strict_schema(schema: dict) -> dict:
    """A copy of a CRD structural schema in which unknown fields fail (the API server prunes them,
    and strict field validation -- kubectl's default -- turns pruning into an error)."""
    s = dict(schema)
    if isinstance(s.get("properties"), dict):
        s["properties"] = {k: strict_schema(v) for k, v in s["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            s[key] = strict_schema(s[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(s.get(key), list):
            s[key] = [strict_schema(x) for x in s[key]]
    if (
        s.get("type") == "object"
        and "additionalProperties" not in s
        and not s.get("x-kubernetes-preserve-unknown-fields")
    ):
        s["additionalProperties"] = False
    return s


@functools.lru_cache(maxsize=None)
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> validator, for every served version of the KubeRay CRDs."""
    if not CRD_DIR.is_dir():
        pytest.skip(
            f"KubeRay v1.7.0 CRDs not found at {CRD_DIR}: to run the KubeRay manifest checks, set "
            "KDSERVE_KUBERAY_CRDS to the folder of the CRD YAMLs (kuberay ray-operator/config/crd/bases)"
        )
    validators = {}
    for name in CRD_FILES:
        path = CRD_DIR / name
        if not path.is_file():
            pytest.fail(f"{path} is missing from the KubeRay CRD folder {CRD_DIR}")
        crd = yaml.load(path.read_text(), Loader=Loader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            # metadata is ObjectMeta (the CRD says just `type: object`): validate_custom checks it
            # against the built-in schema instead
            schema["properties"]["metadata"] = {"type": "object"}
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft4Validator(schema)
    return validators


def validate_builtin(doc: dict) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as e:
        raise ManifestError(f"{doc_id(doc)}: no schema: {e.message}") from None
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path) or "<root>"
        raise ManifestError(f"{doc_id(doc)}: {where}: {e.message}") from None


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, PodTemplateSpec) of the workload kinds used here."""
    spec = doc.get("spec", {})
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [("spec.template", spec["template"])]
    cluster, at = {
        "RayService": (spec.get("rayClusterConfig"), "spec.rayClusterConfig"),
        "RayJob": (spec.get("rayClusterSpec"), "spec.rayClusterSpec"),
        "RayCluster": (spec, "spec"),
    }.get(kind, (None, ""))
    out = []
    if cluster:
        out.append((f"{at}.headGroupSpec.template", cluster["headGroupSpec"]["template"]))
        for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
            out.append((f"{at}.workerGroupSpecs[{i}].template", group["template"]))
    if kind == "RayJob" and spec.get("submitterPodTemplate"):
        out.append(("spec.submitterPodTemplate", spec["submitterPodTemplate"]))
    return out


def validate_custom(doc: dict, validator) -> None:
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    if errors:
        lines = [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message[:300]}" for e in errors[:10]]
        raise ManifestError(f"{doc_id(doc)} does not match its KubeRay CRD:\n" + "\n".join(lines))
    name = doc["metadata"].get("name", "x")
    # ObjectMeta of the custom resource, and every pod template, with the built-in strict schemas
    try:
        validate_builtin({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})
    except ManifestError as e:
        raise ManifestError(f"{doc_id(doc)} metadata (ObjectMeta): {e}") from None
    for where, template in pod_templates(doc):
        try:
            validate_builtin({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                              "template": template})
        except ManifestError as e:
            raise ManifestError(f"{doc_id(doc)} {where}: {e}") from None


def validate(doc: dict) -> None:
    """Raise ManifestError unless ``doc`` validates against its kind's schema (strict)."""
    if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
        raise ManifestError(f"not a Kubernetes object (apiVersion and kind are required): {str(doc)[:80]}")
    if not isinstance(doc.get("metadata"), dict) or not doc["metadata"].get("name"):
        raise ManifestError(f"{doc_id(doc)}: metadata.name is required")
    key = (doc["apiVersion"], doc["kind"])
    validators = crd_validators()
    if key in validators:
        validate_custom(doc, validators[key])
    else:  # a kind kubernetes-validate has no schema for (any other custom kind) fails here
        validate_builtin(doc)
    check_names_and_labels(doc)


DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def check_label_map(labels: dict, where: str) -> None:
    for key, value in (labels or {}).items():
        prefix, _, name = key.rpartition("/")
        prefix_ok = not prefix or (LABEL_PREFIX.match(prefix) and len(prefix) <= 253)
        ok = LABEL_NAME.match(name) and len(name) <= 63 and prefix_ok
        if not ok:
            raise ManifestError(f"{where}: invalid label key {key!r}")
        if not isinstance(value, str) or len(value) > 63 or (value and not LABEL_NAME.match(value)):
            raise ManifestError(f"{where}: invalid label value {key}={value!r}")


def check_names_and_labels(doc: dict) -> None:
    name = doc["metadata"]["name"]
    if not DNS_LABEL.match(name) or len(name) > 63:
        raise ManifestError(f"{doc_id(doc)}: metadata.name must be a DNS-1123 label")
    if doc["kind"] == "Service" and not name[0].isalpha():
        raise ManifestError(f"{doc_id(doc)}: a Service name must start with a letter (DNS-1035)")
    check_label_map(doc["metadata"].get("labels"), doc_id(doc))
    for where, template in pod_templates(doc):
        check_label_map(template.get("metadata", {}).get("labels"), f"{doc_id(doc)} {where}")


@pytest.fixture(scope="session")
def crds():
    return crd_validators()


# ------------------------------------------------------------------------------------------------
# A small, honest kustomize: resources + JSON6902 patches (with target) + images; anything else fails
# ------------------------------------------------------------------------------------------------


def kustomization_file(folder: Path) -> Path:
    found = [folder / n for n in KUSTOMIZATION_NAMES if (folder / n).is_file()]
    assert len(found) == 1, f"{folder}: expected exactly one of {KUSTOMIZATION_NAMES}, found {found}"
    return found[0]


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), f"JSON pointer must start with '/': {path!r}"
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc, parts: list[str], path: str):
    node = doc
    for p in parts:
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ManifestError(f"patch path {path!r}: no list index {p!r}")
            node = node[int(p)]
        elif isinstance(node, dict):
            if p not in node:
                raise ManifestError(f"patch path {path!r}: no field {p!r}")
            node = node[p]
        else:
            raise ManifestError(f"patch path {path!r}: {p!r} is below a scalar")
    return node


def apply_json6902(doc: dict, ops: list[dict]) -> None:
    """RFC 6902 add / remove / replace / test, in place; a path that does not exist fails."""
    for op in ops:
        parts = _pointer(op["path"])
        parent = _walk(doc, parts[:-1], op["path"])
        last = parts[-1]
        kind = op["op"]
        if kind in ("remove", "replace", "test"):
            current = _walk(parent, [last], op["path"])
            if kind == "test" and current != op["value"]:
                raise ManifestError(f"patch test failed at {op['path']}")
            if kind == "remove":
                del parent[int(last) if isinstance(parent, list) else last]
            elif kind == "replace":
                parent[int(last) if isinstance(parent, list) else last] = copy.deepcopy(op["value"])
        elif kind == "add":
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                parent.insert(index, copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        else:
            raise ManifestError(f"patch op {kind!r} is not supported by this test's kustomize subset")


def _split_image(image: str) -> tuple[str, str]:
    """(name, tag) of an image reference (a digest is dropped)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1:]
    return name, ""


def apply_images(docs: list[dict], rules: list[dict]) -> None:
    """kustomize's images transformer: every containers/initContainers image, at any depth."""

    def visit(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for c in value:
                        name, tag = _split_image(c.get("image", ""))
                        for rule in rules:
                            if rule["name"] == name:
                                new = rule.get("newName", name)
                                c["image"] = f"{new}@{rule['digest']}" if rule.get("digest") else \
                                    f"{new}:{rule.get('newTag', tag)}" if rule.get("newTag", tag) else new
                visit(value)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    for d in docs:
        visit(d)


def _matches_target(doc: dict, target: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    want = {"group": group, "version": version, "kind": doc["kind"], "name": doc["metadata"]["name"],
            "namespace": doc["metadata"].get("namespace")}
    unknown = set(target) - set(want)
    if unknown:
        raise ManifestError(f"patch target fields {unknown} are not supported by this test's kustomize subset")
    return all(want[k] == v for k, v in target.items())


def kustomize(folder: Path) -> list[dict]:
    path = kustomization_file(folder)
    k = yaml.load(path.read_text(), Loader=Loader)
    unsupported = set(k) - {"apiVersion", "kind", "resources", "patches", "images"}
    if unsupported:
        raise ManifestError(f"{path}: fields {sorted(unsupported)} are not rendered by this test's kustomize subset")
    docs: list[dict] = []
    for res in k.get("resources", []):
        p = (folder / res).resolve()
        if p.is_dir():
            docs += kustomize(p)
        else:
            if not p.is_file():
                raise ManifestError(f"{path}: resource {res} does not exist")
            docs += copy.deepcopy(load_docs(p))
    for patch in k.get("patches", []):
        if set(patch) != {"path", "target"}:
            raise ManifestError(f"{path}: only file patches with a target are supported here: {patch}")
        ops = yaml.load((folder / patch["path"]).read_text(), Loader=Loader)
        if not isinstance(ops, list):
            raise ManifestError(f"{patch['path']}: expected a JSON6902 list of operations")
        targets = [d for d in docs if _matches_target(d, patch["target"])]
        if len(targets) != 1:
            raise ManifestError(f"{path}: patch {patch['path']} targets {len(targets)} objects, expected 1")
        apply_json6902(targets[0], ops)
    apply_images(docs, k.get("images", []))
    return docs


@pytest.fixture(scope="session")
def overlay_docs() -> list[dict]:
    return kustomize(CPU_OVERLAY)


# ------------------------------------------------------------------------------------------------
# Helpers over the objects
# ------------------------------------------------------------------------------------------------


def selects(selector: dict, labels: dict) -> bool:
    labels = labels or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def template_labels(doc: dict) -> list[dict]:
    return [t.get("metadata", {}).get("labels", {}) for _, t in pod_templates(doc)]


def all_containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def named_ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]["rayClusterSpec"]


def quantity(q) -> float:
    s = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    for u, f in units.items():
        if s.endswith(u):
            return float(s[: -len(u)]) * f
    return float(s)


def serve_config(doc: dict) -> dict:
    cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert isinstance(cfg, dict), "serveConfigV2 must be a YAML mapping"
    return cfg


def repo_serve_config() -> dict:
    return yaml.safe_load((ROOT / "teacher_server" / "serve_config.yaml").read_text())


def resolve(import_path: str, sep: str):
    module, _, attr = import_path.rpartition(sep) if sep == "." else import_path.partition(sep)
    return getattr(importlib.import_module(module), attr)


# ------------------------------------------------------------------------------------------------
# Schema validation
# ------------------------------------------------------------------------------------------------


def test_crd_folder_has_the_kuberay_kinds(crds):
    for kind in ("RayCluster", "RayJob", "RayService"):
        assert ("ray.io/v1", kind) in crds


def test_k8s_version_is_shipped_by_kubernetes_validate():
    shipped = {kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()}
    assert K8S_VERSION in shipped, f"kubernetes-validate ships {sorted(shipped)}"


@pytest.mark.parametrize("label,doc", BASE, ids=[b[0] for b in BASE])
def test_manifest_validates(crds, label, doc):
    validate(doc)


def test_cpu_overlay_renders_and_validates(crds, overlay_docs):
    assert {doc_id(d) for d in overlay_docs} == {doc_id(d) for _, d in BASE}
    errors = []
    for doc in overlay_docs:
        try:
            validate(doc)
        except ManifestError as e:
            errors.append(str(e))
    assert not errors, "\n".join(errors)


def _broken_cases():
    rs = one(BASE, "RayService")
    job = find(BASE, "RayJob")[0]
    dep = one(BASE, "Deployment", "kdserve-triton")
    svc = one(BASE, "Service", TEACHER_SERVICE)
    np_ = find(BASE, "NetworkPolicy")[0]

    def mutate(doc, fn):
        d = copy.deepcopy(doc)
        fn(d)
        return d

    wg = lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]  # noqa: E731
    head = lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]  # noqa: E731
    # case: (document, a fragment of the error it must raise)
    return {
        "rayservice-unknown-spec-field": (
            mutate(rs, lambda d: d["spec"].__setitem__("serveConfigV3", "x")), "'serveConfigV3' was unexpected"),
        "rayservice-unknown-field-in-worker-group": (
            mutate(rs, lambda d: wg(d).__setitem__("replica", 2)), "'replica' was unexpected"),
        "rayservice-worker-group-missing-groupName": (
            mutate(rs, lambda d: wg(d).pop("groupName")), "'groupName' is a required property"),
        "rayservice-replicas-wrong-type": (
            mutate(rs, lambda d: wg(d).__setitem__("replicas", "one")), "'one' is not of type 'integer'"),
        "rayjob-unknown-container-field": (
            mutate(job, lambda d: head(d)["template"]["spec"]["containers"][0].__setitem__("imagePullPolice", "x")),
            "'imagePullPolice' was unexpected"),
        "rayjob-unknown-metadata-field": (
            mutate(job, lambda d: d["metadata"].__setitem__("labelz", {"a": "b"})), "'labelz' was unexpected"),
        "rayjob-rayStartParams-not-strings": (
            mutate(job, lambda d: head(d)["rayStartParams"].__setitem__("num-cpus", 4)), "is not of type 'string'"),
        "deployment-unknown-field": (
            mutate(dep, lambda d: d["spec"].__setitem__("replica", 1)), "'replica' was unexpected"),
        "service-port-wrong-type": (
            mutate(svc, lambda d: d["spec"]["ports"][0].__setitem__("port", "nine")), "'nine' is not of type"),
        "networkpolicy-unknown-field": (
            mutate(np_, lambda d: d["spec"].__setitem__("ingres", [])), "'ingres' was unexpected"),
        "bad-label-value": (
            mutate(svc, lambda d: d["metadata"]["labels"].__setitem__("x", "not ok!")), "invalid label value"),
        "custom-kind-without-schema": (
            {"apiVersion": "kdserve.io/v1", "kind": "Widget", "metadata": {"name": "w"}}, "no schema"),
        "ray-kind-without-crd": (
            {"apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": {"name": "w"}, "spec": {}}, "no schema"),
        "builtin-kind-unknown-to-kubernetes": (
            {"apiVersion": "v1", "kind": "Gadget", "metadata": {"name": "g"}}, "no schema"),
        "kustomization-file-as-manifest": (
            {**yaml.safe_load(kustomization_file(K8S).read_text()), "metadata": {"name": "k"}}, "no schema"),
    }


BROKEN = _broken_cases()


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validator_rejects_broken_documents(crds, case):
    doc, reason = BROKEN[case]
    with pytest.raises(ManifestError, match=re.escape(reason)):
        validate(doc)


# ------------------------------------------------------------------------------------------------
# Layout: kustomization, namespace, kubectl apply -f k8s/
# ------------------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest():
    k = yaml.safe_load(kustomization_file(K8S).read_text())
    listed = k["resources"]
    assert len(listed) == len(set(listed)), "a manifest is listed twice"
    assert sorted(listed) == [p.name for p in manifest_files()]


def test_every_yaml_in_k8s_is_an_api_object():
    """`kubectl apply -f k8s/` reads every *.yaml/*.yml/*.json of the folder (not sub-folders)."""
    for path in manifest_files():
        for doc in load_docs(path):
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path.name
            assert doc["kind"] != "Kustomization", f"{path.name}: kubectl apply -f would fail on it"


def test_namespace_first_and_everything_in_it():
    ns = one(BASE, "Namespace")["metadata"]["name"]
    assert manifest_files()[0].name == next(label for label, d in BASE if d["kind"] == "Namespace").split(":")[0], \
        "the Namespace's file must sort first so `kubectl apply -f k8s/` creates it before the rest"
    for label, doc in BASE:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == ns, label


def test_cpu_overlay_patches_hit_existing_fields_and_remove_every_gpu(overlay_docs):
    k = yaml.safe_load(kustomization_file(CPU_OVERLAY).read_text())
    assert k["resources"] == ["../.."]
    assert k["patches"], "the CPU overlay must patch the GPU objects"
    on_disk = {str(x.relative_to(CPU_OVERLAY)) for x in CPU_OVERLAY.rglob("*.yaml") if x.name not in KUSTOMIZATION_NAMES}
    assert {p["path"] for p in k["patches"]} == on_disk, "every patch file is used, every used one exists"
    text = yaml.safe_dump_all(overlay_docs)
    assert GPU not in text, "the CPU overlay still requests or tolerates GPUs"
    for label, doc in BASE:  # the base does use GPUs where the overlay removes them
        if doc["kind"] in ("RayService", "Deployment") and doc["metadata"]["name"] != TLS_PROXY:
            assert GPU in yaml.safe_dump(doc), label
    # a patch whose path does not exist fails (RFC 6902), so the overlay cannot silently drift
    doc = copy.deepcopy(one(BASE, "Deployment", "kdserve-triton"))
    with pytest.raises(ManifestError):
        apply_json6902(doc, [{"op": "remove", "path": "/spec/template/spec/nodeSelectorr"}])


# ------------------------------------------------------------------------------------------------
# Agreement with the code: the teacher
# ------------------------------------------------------------------------------------------------


def _check_serve_config(rs: dict) -> dict:
    from ray.serve.schema import ServeDeploySchema

    from teacher_server import serve_app
    from kdserve.teacher_config import TeacherConfig

    cfg = serve_config(rs)
    ServeDeploySchema.model_validate(cfg)  # Ray Serve's own config schema (unknown keys fail)
    repo = repo_serve_config()
    assert cfg["grpc_options"]["port"] == repo["grpc_options"]["port"] == 9000
    assert cfg["grpc_options"]["grpc_servicer_functions"] == [serve_app.SERVICER]
    assert repo["grpc_options"]["grpc_servicer_functions"] == [serve_app.SERVICER]
    assert callable(resolve(serve_app.SERVICER, "."))
    assert cfg["http_options"]["port"] == repo["http_options"]["port"]
    (app,) = cfg["applications"]
    assert app["name"] == serve_app.APP_NAME
    assert app["import_path"] == repo["applications"][0]["import_path"] == "teacher_server.serve_app:build_app"
    builder = resolve(app["import_path"], ":")
    assert callable(builder) and builder is serve_app.build_app
    return {"cfg": cfg, "teacher": TeacherConfig(**app["args"])}


def test_serve_config_matches_the_code():
    rs = one(BASE, "RayService")
    teacher = _check_serve_config(rs)["teacher"]
    assert teacher.serve.num_gpus >= 1 and teacher.device.startswith("cuda")
    (group,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    per_pod = quantity(worker["resources"]["limits"][GPU])
    scaling = teacher.serve.autoscaling
    assert scaling is not None and rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    # the cluster can grow to hold max_replicas and starts with room for min_replicas
    assert per_pod * group["maxReplicas"] >= teacher.serve.num_gpus * scaling.max_replicas, "maxReplicas too low"
    assert per_pod * group["minReplicas"] >= teacher.serve.num_gpus * scaling.min_replicas, "minReplicas too low"
    assert quantity(worker["resources"]["limits"]["cpu"]) >= teacher.serve.num_cpus


def test_cpu_overlay_serve_config(overlay_docs):
    rs = one(overlay_docs, "RayService")
    teacher = _check_serve_config(rs)["teacher"]
    assert teacher.serve.num_gpus == 0 and teacher.device == "cpu"
    worker = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert quantity(worker["resources"]["limits"]["cpu"]) >= teacher.serve.num_cpus


def test_teacher_service_ports_and_selector():
    rs = one(BASE, "RayService")
    svc = one(BASE, "Service", TEACHER_SERVICE)
    grpc_port = serve_config(rs)["grpc_options"]["port"]
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["grpc"]["port"] == grpc_port == 9000
    cluster = rs["spec"]["rayClusterConfig"]
    selected = [g for g in cluster["workerGroupSpecs"] if selects({"matchLabels": svc["spec"]["selector"]},
                                                                   g["template"]["metadata"]["labels"])]
    assert selected, "the teacher Service selects no worker pod of the RayService"
    head_labels = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
    assert not selects({"matchLabels": svc["spec"]["selector"]}, head_labels), "the head has no replica"
    for group in selected:
        container = group["template"]["spec"]["containers"][0]
        cports = named_ports(container)
        for p in svc["spec"]["ports"]:
            target = p["targetPort"]
            assert (cports.get(target) if isinstance(target, str) else target) == p["port"], p["name"]
        assert group["rayStartParams"]["metrics-export-port"] == str(ports["metrics"]["port"]) == "8080"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["metrics-export-port"] == "8080"
    assert named_ports(head["template"]["spec"]["containers"][0])["dashboard"] == 8265


def test_headless_service_names_each_replicas_own_endpoint():
    rs = one(BASE, "RayService")
    svc = one(BASE, "Service", "kdserve-teacher-replicas")
    assert svc["spec"]["clusterIP"] == "None"  # headless: a DNS record per pod, no virtual IP
    direct_port = serve_config(rs)["applications"][0]["args"]["serve"]["direct_port"]
    (port,) = svc["spec"]["ports"]
    assert port["port"] == direct_port == 9100
    cluster = rs["spec"]["rayClusterConfig"]
    selected = [g for g in cluster["workerGroupSpecs"] if selects({"matchLabels": svc["spec"]["selector"]},
                                                                   g["template"]["metadata"]["labels"])]
    assert selected, "the headless Service selects no worker pod of the RayService"
    for group in selected:
        assert named_ports(group["template"]["spec"]["containers"][0])[port["targetPort"]] == direct_port


def test_teacher_probes_check_raylet_gcs_and_serve():
    rs = one(BASE, "RayService")
    http_port = serve_config(rs)["http_options"]["port"]
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert "gcs_healthz" in " ".join(head[probe]["exec"]["command"])
    for group in cluster["workerGroupSpecs"]:
        worker = group["template"]["spec"]["containers"][0]
        ready = " ".join(worker["readinessProbe"]["exec"]["command"])
        assert "local_raylet_healthz" in ready and f"localhost:{http_port}/-/healthz" in ready
        assert "local_raylet_healthz" in " ".join(worker["livenessProbe"]["exec"]["command"])


# ------------------------------------------------------------------------------------------------
# Agreement with the code: the student experiments
# ------------------------------------------------------------------------------------------------


def test_rayjobs_run_distill_job_against_the_shared_teacher():
    from kdserve.config import load
    from student_workers.train.job_config import JobConfig

    svc = one(BASE, "Service", TEACHER_SERVICE)
    ns = svc["metadata"]["namespace"]
    grpc_port = {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"]
    wait_cm = one(BASE, "ConfigMap", "kdserve-wait-for-teacher")
    jobs = find(BASE, "RayJob")
    assert len(jobs) >= 2, "two example experiments share the teacher"
    configs = {}
    for job in jobs:
        name = job["metadata"]["name"]
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:2] == ["python", "distill_job.py"] and argv[2] == "--config" and len(argv) == 4, argv
        assert (ROOT / argv[1]).is_file()
        path = ROOT / argv[3]
        assert path.is_file(), f"{name}: {argv[3]} does not exist in the repository"
        cfg = load(JobConfig, path)
        url = urlparse(cfg.teacher.address or "")
        assert url.scheme == "grpc" and url.hostname == f"{TEACHER_SERVICE}.{ns}.svc.cluster.local", cfg.teacher.address
        assert url.port == grpc_port
        configs[name] = cfg
        # the experiment label carries the run name: the experiment id in the teacher's metrics
        assert job["metadata"]["labels"]["kdserve.io/experiment"] == cfg.run.name
        cluster = job["spec"]["rayClusterSpec"]
        head = cluster["headGroupSpec"]
        tspec = head["template"]["spec"]
        # the init container waits for the teacher named in the same config
        (init,) = tspec["initContainers"]
        assert init["command"][-1] == argv[3]
        script_mount = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
        volumes = {v["name"]: v for v in tspec["volumes"]}
        cm_volume = next(n for n, v in volumes.items() if "configMap" in v)
        assert volumes[cm_volume]["configMap"]["name"] == wait_cm["metadata"]["name"]
        script = init["command"][1]
        assert script.startswith(script_mount[cm_volume] + "/")
        compile(wait_cm["data"][script.rsplit("/", 1)[1]], script, "exec")
        # run.storage_path is a volume of the head container (the driver and Train workers run there)
        mounts = {m["mountPath"] for m in tspec["containers"][0]["volumeMounts"]}
        assert cfg.run.storage_path in mounts, f"{name}: run.storage_path {cfg.run.storage_path} is not mounted"
        cpus = float(head["rayStartParams"]["num-cpus"]) + sum(
            float(g["rayStartParams"].get("num-cpus", 0)) * g.get("replicas", 0)
            for g in cluster.get("workerGroupSpecs", [])
        )
        assert cpus >= cfg.train.num_workers * cfg.train.cpus_per_worker, f"{name}: too few CPUs for Ray Train"
        assert job["spec"]["shutdownAfterJobFinishes"] is True
    a, b = list(configs.values())[:2]
    assert a.run.name != b.run.name, "the experiments need distinct run names (= experiment ids)"
    assert (a.student, a.distill) != (b.student, b.distill), "the two experiments should differ"


def test_network_policies_let_only_students_reach_the_teachers():
    rayservice = one(BASE, "RayService")
    triton = one(BASE, "Deployment", "kdserve-triton")
    students = [lab for job in find(BASE, "RayJob") for lab in template_labels(job)]
    proxy = one(BASE, "Deployment", TLS_PROXY)
    teachers = {"ray-serve": template_labels(rayservice), "triton": template_labels(triton),
                "tls-proxy": template_labels(proxy)}
    service_ports = {"ray-serve": one(BASE, "Service", TEACHER_SERVICE),
                     "triton": one(BASE, "Service", "kdserve-triton"),
                     "tls-proxy": one(BASE, "Service", TLS_PROXY)}
    policies = find(BASE, "NetworkPolicy")
    covered = set()
    for np_ in policies:
        spec = np_["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        backend = [b for b, labels in teachers.items() if all(selects(spec["podSelector"], lab) for lab in labels)]
        assert len(backend) == 1, f"{np_['metadata']['name']} must select all pods of exactly one teacher"
        backend = backend[0]
        covered.add(backend)
        assert not any(selects(spec["podSelector"], lab) for lab in students)
        other = [lab for b, labels in teachers.items() if b != backend for lab in labels]
        assert not any(selects(spec["podSelector"], lab) for lab in other)
        student_rules = []
        for rule in spec["ingress"]:
            for peer in rule["from"]:
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    sel = peer["podSelector"]
                    if any(selects(sel, lab) for lab in students):
                        assert all(selects(sel, lab) for lab in students), "every student pod must be allowed"
                        student_rules.append(rule)
                    elif backend == "ray-serve" and all(selects(sel, lab) for lab in teachers["tls-proxy"]):
                        # the TLS proxy forwards to the teacher's gRPC port, and only there
                        assert [p["port"] for p in rule["ports"]] == [
                            next(p["port"] for p in service_ports["ray-serve"]["spec"]["ports"] if p["name"] == "grpc")]
                    else:  # the teacher's own pods (Ray's internal traffic), nobody else
                        assert all(selects(sel, lab) for lab in teachers[backend])
                        assert not any(selects(sel, lab) for lab in other)
                else:  # namespaces (operator, Prometheus) only on named ports
                    assert rule.get("ports"), f"{np_['metadata']['name']}: a namespace peer on all ports"
        assert student_rules, f"{np_['metadata']['name']}: students cannot reach the teacher"
        grpc = next(p["port"] for p in service_ports[backend]["spec"]["ports"] if p["name"] == "grpc")
        assert any(p["port"] == grpc for r in student_rules for p in r["ports"])
    assert covered == set(teachers)


def test_services_and_pdbs_select_pods():
    templates = [lab for _, d in BASE for lab in template_labels(d)]
    for svc in find(BASE, "Service"):
        assert any(selects({"matchLabels": svc["spec"]["selector"]}, lab) for lab in templates), svc["metadata"]["name"]
    for pdb in find(BASE, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]
        assert any(selects(sel, lab) for lab in templates), pdb["metadata"]["name"]
        # a teacher PDB only, never the one-off student pods
        assert all(lab.get("app.kubernetes.io/component") == "teacher" for lab in templates if selects(sel, lab))


def _triton_commands(dep: dict) -> tuple[list[str], str]:
    """(the generator's argv with $(VAR)s expanded from the init container's env, the server command)."""
    spec = dep["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    env = {e["name"]: e["value"] for e in init.get("env", [])}
    script = " ".join(init.get("command", []) + init.get("args", []))
    script = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], script)  # kubelet's expansion
    gen = re.search(r"python -m teacher_server\.triton ([^;]*)", script)
    assert gen, f"the init container does not run the model-repository generator: {script}"
    (server,) = spec["containers"]
    return shlex.split(gen.group(1)), " ".join(server.get("command", []) + server.get("args", []))


def test_triton_deployment_and_service():
    dep = one(BASE, "Deployment", "kdserve-triton")
    svc = one(BASE, "Service", "kdserve-triton")
    (server,) = dep["spec"]["template"]["spec"]["containers"]
    assert server["image"].startswith("nvcr.io/nvidia/tritonserver:") and server["image"].endswith("-py3")
    _, cmd = _triton_commands(dep)
    for flag in ("--grpc-port=8001", "--http-port=8000", "--metrics-port=8002"):
        assert flag in cmd
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert ports == {"grpc": 8001, "http": 8000, "metrics": 8002}
    cports = named_ports(server)
    for p in svc["spec"]["ports"]:
        assert cports[p["targetPort"]] == p["port"]
    assert selects(dep["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("which", ["base", "cpu-overlay"])
def test_triton_generator_arguments_match_the_code(which, overlay_docs):
    """The init container's `python -m teacher_server.triton ...` parses with the real CLI."""
    from teacher_server.__main__ import resolve_config
    from teacher_server.triton import MODEL_NAME
    from teacher_server.triton.repository import parse_args

    dep = one([d for _, d in BASE] if which == "base" else overlay_docs, "Deployment", "kdserve-triton")
    argv, cmd = _triton_commands(dep)
    args = parse_args(argv)
    resolve_config(args)  # a valid TeacherConfig
    assert args.name == MODEL_NAME == "kdserve_teacher"
    assert re.search(rf"--model-repository={re.escape(args.out)}(\s|$)", cmd), cmd
    assert args.instance_kind == ("gpu" if which == "base" else "cpu")
    (init,) = dep["spec"]["template"]["spec"]["initContainers"]
    assert f"mkdir -p {args.project_path};" in " ".join(init["args"]), "--project-path must be the copied sources"
    assert MODEL_NAME in (K8S / "README.md").read_text()


# ------------------------------------------------------------------------------------------------
# Resources and images
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["base", "cpu-overlay"])
def test_every_container_has_requests_and_limits(which, overlay_docs):
    docs = [d for _, d in BASE] if which == "base" else overlay_docs
    for doc in docs:
        for where, template in pod_templates(doc):
            for c in all_containers(template):
                res = c.get("resources", {})
                for key in ("cpu", "memory"):
                    req, lim = res.get("requests", {}).get(key), res.get("limits", {}).get(key)
                    assert req is not None and lim is not None, f"{doc_id(doc)} {where} {c['name']}: {key}"
                    assert quantity(req) <= quantity(lim), f"{doc_id(doc)} {where} {c['name']}: {key}"
                if GPU in res.get("limits", {}):
                    assert res["limits"][GPU] == res.get("requests", {}).get(GPU, res["limits"][GPU])


def _kdserve_images(docs) -> set[str]:
    images = set()
    for doc in docs:
        for _, template in pod_templates(doc):
            images |= {c["image"] for c in all_containers(template) if not c["image"].startswith(THIRD_PARTY_IMAGES)}
    return images


def test_images_match_the_dockerfile(overlay_docs):
    dockerfile = (ROOT / "Dockerfile").read_text()
    ray_tag = re.search(r"^ARG RAY_TAG=(\S+)$", dockerfile, re.M).group(1)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_TAG\}$", dockerfile, re.M)
    versions = {cluster_spec(d)["rayVersion"] for _, d in BASE if d["kind"] in ("RayService", "RayJob")}
    assert len(versions) == 1
    (ray_version,) = versions
    assert ray_tag == f"{ray_version}-py311-gpu", "the image's Ray must be the rayVersion of the manifests"
    assert f"{ray_version}-py311-cpu" in dockerfile
    assert _kdserve_images([d for _, d in BASE]) == {KDSERVE_IMAGE}
    assert _kdserve_images(overlay_docs) == {KDSERVE_CPU_IMAGE}
    for image in (KDSERVE_IMAGE, KDSERVE_CPU_IMAGE):
        assert image in dockerfile and image in (K8S / "README.md").read_text()
    # the image's working directory holds what the RayJob entrypoints name
    workdir = re.findall(r"^WORKDIR (\S+)$", dockerfile, re.M)[-1]
    assert workdir.startswith("/home/ray/")
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    needed = ["distill_job.py", "pyproject.toml", "README.md", "kdserve", "teacher_server", "student_workers", "kdjob"]
    needed += [shlex.split(j["spec"]["entrypoint"])[3] for j in find(BASE, "RayJob")]
    for path in needed:
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        assert not any(fnmatch.fnmatch(p, pat.lstrip("/")) for p in prefixes for pat in ignored), \
            f".dockerignore leaves {path} out of the image"


# ------------------------------------------------------------------------------------------------
# Security: the shared token and the TLS proxy
# ------------------------------------------------------------------------------------------------


def _secret_files(template: dict, container: dict, secret: str) -> set[str]:
    """Paths at which ``container`` sees the keys of Secret ``secret`` (whole-Secret volume mounts)."""
    vols = {v["name"]: v for v in template["spec"].get("volumes", []) if v.get("secret", {}).get("secretName") == secret}
    out = set()
    for m in container.get("volumeMounts", []):
        if m["name"] in vols:
            assert m.get("readOnly") is True, f"{container['name']}: mount the token read-only"
            keys = [i["path"] for i in vols[m["name"]]["secret"].get("items", [])] or ["token"]
            out |= {f"{m['mountPath']}/{k}" for k in keys}
    return out


def test_token_is_mounted_where_the_teacher_and_students_read_it():
    from kdserve.config import load
    from kdserve.teacher_config import TeacherConfig
    from student_workers.train.job_config import JobConfig

    rs = one(BASE, "RayService")
    (app,) = serve_config(rs)["applications"]
    token_file = TeacherConfig(**app["args"]).serve.auth_token_file
    assert token_file, "the shared teacher must require the token"
    cluster = rs["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for t in templates:  # wherever a replica may run (the Serve app reads the file in the replica)
        assert token_file in _secret_files(t, t["spec"]["containers"][0], TOKEN_SECRET)
    for job in find(BASE, "RayJob"):
        cfg = load(JobConfig, ROOT / shlex.split(job["spec"]["entrypoint"])[3])
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
        assert cfg.teacher.auth_token_file, job["metadata"]["name"]
        for c in head["spec"]["containers"] + head["spec"]["initContainers"]:  # trainer and wait-for-teacher
            assert cfg.teacher.auth_token_file in _secret_files(head, c, TOKEN_SECRET), (job["metadata"]["name"], c["name"])
    # the init script passes the token on, or it would wait forever on UNAUTHENTICATED
    script = one(BASE, "ConfigMap", "kdserve-wait-for-teacher")["data"]["wait_for_teacher.py"]
    assert "auth_token_file=cfg.teacher.auth_token_file" in script
    # no token value is shipped: the Secret is created by the operator (k8s/README.md)
    assert not find(BASE, "Secret")


def test_tls_proxy_terminates_tls_and_forwards_to_the_teacher_service():
    cm = one(BASE, "ConfigMap", "kdserve-teacher-tls-proxy")
    envoy = yaml.safe_load(cm["data"]["envoy.yaml"])
    (listener,) = envoy["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    tls_ctx = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls_ctx["alpn_protocols"] == ["h2"]
    cert_files = {tls_ctx["tls_certificates"][0]["certificate_chain"]["filename"],
                  tls_ctx["tls_certificates"][0]["private_key"]["filename"]}
    dep = one(BASE, "Deployment", TLS_PROXY)
    tmpl = dep["spec"]["template"]
    (c,) = tmpl["spec"]["containers"]
    assert cert_files == _secret_files(
        {"spec": {"volumes": [{**v, "secret": {**v["secret"], "items": [{"key": k, "path": k} for k in ("tls.crt", "tls.key")]}}
                              if "secret" in v else v for v in tmpl["spec"]["volumes"]]}}, c, "kdserve-teacher-tls")
    (cluster,) = envoy["static_resources"]["clusters"]
    addr = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    svc = one(BASE, "Service", TEACHER_SERVICE)
    grpc_port = {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"]
    assert addr == {"address": f"{TEACHER_SERVICE}.{svc['metadata']['namespace']}.svc.cluster.local", "port_value": grpc_port}
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])
    listen = listener["address"]["socket_address"]["port_value"]
    ports = named_ports(c)
    assert ports["grpcs"] == listen
    proxy_svc = one(BASE, "Service", TLS_PROXY)
    assert proxy_svc["spec"]["ports"][0]["targetPort"] == "grpcs"
    assert c["readinessProbe"]["httpGet"]["port"] == "admin" and ports["admin"] == envoy["admin"]["address"]["socket_address"]["port_value"]
