"""deploy/: manifests parse, agree with each other and with the CLI (no Docker, no cluster)."""

from __future__ import annotations

import functools
import json
import py_compile
import re
from pathlib import Path

import pytest
import yaml

from livercube import registry
from livercube.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
#: what the Dask operator injects into job-runner pods (scheme included)
OPERATOR_SCHEDULER = "tcp://livercube-crlm-scheduler.livercube.svc.cluster.local:8786"


@functools.cache
def _parsed() -> tuple[tuple[Path, str], ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    out = []
    for path in MANIFESTS:
        text = path.read_text()
        out += [(path, json.dumps(d)) for d in yaml.load_all(text, Loader=loader) if d is not None]
    return tuple(out)


def _docs() -> list[tuple[Path, dict]]:
    """Every YAML document of deploy/kubernetes (fresh copies; parsed once)."""
    return [(path, json.loads(d)) for path, d in _parsed()]


def _containers(doc: dict) -> list[tuple[str, dict]]:
    """(role, container) for every container a manifest would run."""
    kind, spec = doc["kind"], doc["spec"]
    if kind == "DaskJob":
        roles = [("job", spec["job"]["spec"])]
        spec = spec["cluster"]["spec"]
    elif kind == "Job":
        roles = [("job", spec["template"]["spec"])]
        spec = {}
    else:
        roles = []
    if "worker" in spec:
        roles += [("worker", spec["worker"]["spec"]), ("scheduler", spec["scheduler"]["spec"])]
    return [(role, c) for role, pod in roles for c in pod["containers"]]


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion in args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), arg)


def _dockerfile_exec_form(instruction: str) -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith(f"{instruction} ")]
    assert len(lines) == 1, f"exactly one {instruction} expected"
    return json.loads(lines[0][len(instruction) + 1 :])  # exec (JSON) form, no shell


def test_manifests_parse_with_expected_kinds():
    assert {p.name for p in MANIFESTS} >= {"daskjob.yaml", "daskcluster.yaml"}
    kinds = {(d["apiVersion"], d["kind"]) for _, d in _docs()}
    assert ("kubernetes.dask.org/v1", "DaskJob") in kinds
    assert ("kubernetes.dask.org/v1", "DaskCluster") in kinds
    assert ("batch/v1", "Job") in kinds
    for path, d in _docs():
        assert {"apiVersion", "kind", "metadata", "spec"} <= d.keys(), path
        assert d["metadata"]["name"], path
        if d["kind"] == "DaskJob":
            assert {"job", "cluster"} <= d["spec"].keys()
            assert {"worker", "scheduler"} <= d["spec"]["cluster"]["spec"].keys()
            assert d["spec"]["job"]["spec"]["restartPolicy"] == "Never"
        if d["kind"] == "DaskCluster":
            assert {"worker", "scheduler"} <= d["spec"].keys()


def test_scheduler_services_select_their_own_cluster():
    for _, d in _docs():
        if d["kind"] not in ("DaskJob", "DaskCluster"):
            continue
        cluster = d["spec"]["cluster"]["spec"] if d["kind"] == "DaskJob" else d["spec"]
        svc = cluster["scheduler"]["service"]
        # the operator names the cluster after the DaskJob/DaskCluster
        assert svc["selector"]["dask.org/cluster-name"] == d["metadata"]["name"]
        assert {p["port"] for p in svc["ports"]} >= {8786, 8787}


def test_one_image_everywhere():
    images = {c["image"] for _, d in _docs() for _, c in _containers(d)}
    assert len(images) == 1, images
    (image,) = images
    assert re.fullmatch(r"[\w.\-/]+:[\w.\-]+", image), "pin a tag, not :latest by accident"
    assert not image.endswith(":latest")
    readme = (DEPLOY / "README.md").read_text()
    assert image in readme, "deploy/README.md must build and push the image the manifests use"


def test_roles_run_the_right_programs():
    roles = {}
    for _, d in _docs():
        for role, c in _containers(d):
            assert "command" not in c, "keep the image ENTRYPOINT (tini); put the program in args"
            roles.setdefault(role, []).append(c["args"])
    assert all(a[:2] == ["livercube", "convert"] for a in roles["job"])
    assert all(a[:2] == ["dask", "worker"] for a in roles["worker"])
    assert all(a[:2] == ["dask", "scheduler"] for a in roles["scheduler"])
    for args in roles["worker"]:
        assert args[args.index("--nthreads") + 1] == "1"


def _job_env(doc: dict, container: dict) -> dict[str, str]:
    env = {e["name"]: e.get("value", "<secret>") for e in container.get("env", [])}
    if doc["kind"] == "DaskJob":  # injected by the operator
        ns = doc["metadata"]["namespace"]
        env["DASK_SCHEDULER_ADDRESS"] = (
            f"tcp://{doc['metadata']['name']}-scheduler.{ns}.svc.cluster.local:8786"
        )
    return env


def test_job_command_is_accepted_by_the_cli_parser():
    jobs = [(d, c) for _, d in _docs() for role, c in _containers(d) if role == "job"]
    assert len(jobs) >= 2
    for doc, c in jobs:
        env = _job_env(doc, c)
        argv = [_expand(a, env) for a in c["args"][1:]]
        assert not any("$(" in a for a in argv), f"unexpanded variable in {argv}"
        ns = build_parser().parse_args(argv)
        assert ns.command == "convert"
        assert ns.collection in registry.ids()
        assert ns.source.startswith("s3://") and ns.dest.startswith("s3://")
        # operator's value already carries the scheme: "tcp://tcp://…" would be a bug
        assert re.fullmatch(r"tcp://[a-z0-9.\-]+:8786", ns.scheduler), ns.scheduler
        assert doc["metadata"]["namespace"] in ns.scheduler


def test_daskjob_scheduler_address_is_the_operators():
    (doc,) = [d for _, d in _docs() if d["kind"] == "DaskJob"]
    (c,) = doc["spec"]["job"]["spec"]["containers"]
    assert "$(DASK_SCHEDULER_ADDRESS)" in c["args"]
    assert _job_env(doc, c)["DASK_SCHEDULER_ADDRESS"] == OPERATOR_SCHEDULER
    names = {e["name"] for e in c.get("env", [])}
    assert "DASK_SCHEDULER_ADDRESS" not in names, "the operator sets it; do not override"


def test_plain_job_points_at_its_daskcluster_service():
    (cluster,) = [d for _, d in _docs() if d["kind"] == "DaskCluster"]
    (job,) = [d for _, d in _docs() if d["kind"] == "Job"]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    addr = _job_env(job, c)["DASK_SCHEDULER_ADDRESS"]
    name, ns = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    assert addr == f"tcp://{name}-scheduler.{ns}.svc.cluster.local:8786"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


SECRET_NAMES = re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY)", re.I)


def test_credentials_come_from_a_secret_never_inline():
    seen = 0
    for path, d in _docs():
        assert d["kind"] != "Secret", f"{path}: create the Secret with kubectl, not in git"
        for role, c in _containers(d):
            for e in c.get("env", []):
                if SECRET_NAMES.search(e["name"]):
                    assert "value" not in e, f"{path}: {e['name']} inline"
                    assert e["valueFrom"]["secretKeyRef"]["name"] == "livercube-s3"
                    seen += 1
            if role in ("job", "worker"):  # both touch the bucket
                names = {e["name"] for e in c.get("env", [])}
                assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names, (path, role)
            for a in c["args"]:
                assert not SECRET_NAMES.search(a.split("=")[0]), f"{path}: secret in args {a}"
    assert seen >= 4
    text = "\n".join(p.read_text() for p in MANIFESTS)
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)


def test_workers_and_jobs_have_memory_limits():
    for _, d in _docs():
        for role, c in _containers(d):
            res = c.get("resources", {})
            assert res.get("limits", {}).get("memory"), (d["metadata"]["name"], role)


def test_dockerfile_entrypoint_is_the_livercube_console_script():
    entry = _dockerfile_exec_form("ENTRYPOINT")
    cmd = _dockerfile_exec_form("CMD")
    argv = entry + cmd
    # tini (PID 1) may wrap the program; what it runs by default is `livercube`
    if argv[0] == "tini":
        argv = argv[argv.index("--") + 1 :]
    assert argv[0] == "livercube"
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:", text, re.M)
    assert "pip install" in text and "pip wheel" in text  # the project itself is installed
    for needed in ("pyproject.toml", "pipelines/", "schemas/"):
        assert needed in text, f"the wheel build needs {needed}"
    assert re.search(r"^USER (?!root|0\b)", text, re.M), "do not run as root"


def test_livercube_console_script_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^livercube = "livercube\.cli:main"', text, re.M)


def test_slurm_script_compiles_without_dask_jobqueue(tmp_path):
    path = DEPLOY / "slurm" / "convert_slurm.py"
    py_compile.compile(str(path), cfile=str(tmp_path / "convert_slurm.pyc"), doraise=True)
    text = path.read_text()
    assert "SLURMCluster(" in text and ".scale(" in text
    assert "scheduler=cluster.scheduler_address" in text
    # dask_jobqueue imported lazily, inside main(): the module imports without it
    assert not re.search(r"^(from dask_jobqueue|import dask_jobqueue)", text, re.M)


def test_slurm_script_arguments_match_the_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_slurm", DEPLOY / "slurm" / "convert_slurm.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = mod.parse_args(["s3://a/CRLM", "s3://b/store.zarr", "--collection", "crlm", "--jobs", "4"])
    assert (a.collection, a.jobs, a.workers_per_job) == ("crlm", 4, 4)
    # the CLI would accept the same source/dest/collection
    build_parser().parse_args(["convert", a.source, a.dest, "--collection", a.collection])


@pytest.mark.parametrize("section", ["docker build", "docker push", "kubectl apply", "Secret"])
def test_readme_has_the_commands(section):
    text = (DEPLOY / "README.md").read_text()
    assert section in text


def test_readme_commands_use_files_that_exist():
    text = (DEPLOY / "README.md").read_text()
    refs = set(re.findall(r"deploy/[\w./\-]+", text))
    assert refs
    for ref in refs:
        assert (ROOT / ref.rstrip(".")).exists(), ref
