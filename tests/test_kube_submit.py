"""workflows/kube.py and `secvec render` / `secvec submit` against a fake Kubernetes API server.

The fake server (http.server on 127.0.0.1, random port) answers the two calls the client makes:
``POST /apis/ray.io/v1/namespaces/<ns>/rayjobs`` (body checked against the KubeRay RayJob CRD) and
``GET .../rayjobs/<name>``, whose status follows a scripted sequence. The kubernetes client reaches
it through a generated kubeconfig, exactly as it would reach a real cluster.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

try:
    from tests.conftest_kube import REPO_ROOT, pod_specs, pss_restricted_violations, validation_errors
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from conftest_kube import REPO_ROOT, pod_specs, pss_restricted_violations, validation_errors

from workflows import cli_kube, kube

NAMESPACE = "ml-team"
SPEC = """\
name: Guarded Finetune
scaling:
  num_workers: 3
  use_gpu: true
  resources_per_worker: {CPU: 6, GPU: 1}
tracking: {tracking_uri: "http://secvec-mlflow.ml-team.svc:5000"}
stages: [vector, finetune]
"""
IMAGE = "reg.example.com/secvec:1"
RUNNING = {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}
SUCCEEDED = {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}
FAILED = {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed", "reason": "AppFailed", "message": "exit 1"}


class FakeApiServer:
    """Plays the Kubernetes API server for RayJob create/get; records every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.created: dict[str, dict[str, Any]] = {}
        self.statuses: list[dict[str, Any]] = [{}]
        self.post_error: tuple[int, dict[str, Any]] | None = None
        # Played before the scripted statuses, one per GET: ("error", code), ("hang", seconds) or ("gone",).
        self.get_faults: list[tuple[Any, ...]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802
                # kubernetes 37 sends no Content-Type here: read the body by length alone.
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                server.requests.append(
                    {
                        "method": "POST",
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
                if server.post_error:
                    code, status = server.post_error
                    return self._reply(
                        code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, **status}
                    )
                name = body["metadata"]["name"]
                created = {**body, "metadata": {**body["metadata"], "uid": "u-1", "resourceVersion": "1"}}
                server.created[name] = created
                self._reply(201, created)

            def do_GET(self) -> None:  # noqa: N802
                server.requests.append({"method": "GET", "path": self.path})
                if server.get_faults:
                    fault = server.get_faults.pop(0)
                    if fault[0] == "hang":
                        time.sleep(fault[1])
                        return None
                    if fault[0] == "gone":
                        server.created.clear()
                    else:
                        code = fault[1]
                        return self._reply(code, {"kind": "Status", "code": code, "message": f"fault {code}"})
                prefix = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayjobs/"
                name = self.path.removeprefix(prefix)
                if not self.path.startswith(prefix) or name not in server.created:
                    return self._reply(
                        404, {"kind": "Status", "code": 404, "reason": "NotFound", "message": "not found"}
                    )
                status = server.statuses.pop(0) if len(server.statuses) > 1 else server.statuses[0]
                self._reply(200, {**server.created[name], "status": status})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def write_kubeconfig(path: Path, port: int) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "tester", "user": {"token": "test-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester"}}],
                "current-context": "fake",
            }
        )
    )
    return path


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(SPEC)
    return path


@pytest.fixture
def kubeconfig(tmp_path: Path, api_server: FakeApiServer) -> Path:
    return write_kubeconfig(tmp_path / "kubeconfig", api_server.port)


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    cli_kube.register(app)
    return app


def submit(cli: typer.Typer, spec: Path, kubeconfig: Path, *extra: str) -> Any:
    args = ["submit", str(spec), "--namespace", NAMESPACE, "--kubeconfig", str(kubeconfig)]
    if "--template" not in extra:
        args += ["--image", IMAGE]
    return CliRunner().invoke(cli, [*args, *extra])


# --- render ---------------------------------------------------------------------------------------


def test_render_rayjob_is_valid_and_runs_the_spec_from_config() -> None:
    rayjob = kube.render_rayjob(
        SPEC, name="gf-1", namespace=NAMESPACE, image=IMAGE, mlflow_tracking_uri="http://mlflow:5000"
    )
    assert validation_errors([rayjob]) == []
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["entrypoint"] == "secvec run /config/pipeline.yaml"
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["maxReplicas"] == 3
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["cpu"] == "6"
    for template in [spec["rayClusterSpec"]["headGroupSpec"]["template"], group["template"]]:
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        ray = pod["containers"][0]
        assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in ray["env"]
        assert {"name": "secvec-pipeline", "mountPath": "/config", "readOnly": True} in ray["volumeMounts"]
        (init,) = pod["initContainers"]
        assert init["env"] == [{"name": "SECVEC_PIPELINE_YAML", "value": SPEC}]


def test_inline_pipeline_delivery_writes_the_exact_spec(tmp_path: Path) -> None:
    """Run the init container's command with /config pointed at a temporary directory."""
    rayjob = kube.render_rayjob(SPEC + "note: '100% \\\\ $HOME `x`'\n", name="gf-1", image=IMAGE)
    init = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["initContainers"][0]
    command = [part.replace("/config/", f"{tmp_path}/") for part in init["command"]]
    env = {item["name"]: item["value"] for item in init["env"]}
    subprocess.run(command, env={**env, "PATH": "/usr/bin:/bin"}, check=True, timeout=30)
    assert (tmp_path / "pipeline.yaml").read_text() == env["SECVEC_PIPELINE_YAML"]


def test_sizing_follows_the_spec_with_the_pipeline_defaults_and_refuses_mismatches() -> None:
    plain = kube.render_rayjob("name: x\n", name="b", image=IMAGE)
    (group,) = plain["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    # workflows.specs.ScalingSpec defaults: 2 workers, no GPU, 1 CPU each (what `secvec run` would ask Ray for).
    defaults = __import__("workflows.specs", fromlist=["ScalingSpec"]).ScalingSpec()
    container = group["template"]["spec"]["containers"][0]
    assert group["replicas"] == defaults.num_workers == 2 and defaults.use_gpu is False
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert float(container["resources"]["requests"]["cpu"]) == defaults.resources_per_worker["CPU"]
    assert validation_errors([plain]) == []
    with pytest.raises(ValueError, match="scaling.num_workers is 3"):
        kube.render_rayjob(SPEC, name="a", image=IMAGE, num_workers=1)
    with pytest.raises(ValueError, match="asks 1 GPU"):
        kube.render_rayjob(SPEC, name="a", image=IMAGE, gpus_per_worker=0)
    assert kube.render_rayjob(SPEC, name="a", image=IMAGE, num_workers=3, gpus_per_worker=1)
    with pytest.raises(kube.PipelineSpecError, match="one device"):
        kube.render_rayjob(SPEC.replace("GPU: 1", "GPU: 2"), name="a", image=IMAGE)


def test_default_names_are_dns_labels_within_kuberay_limits() -> None:
    name = kube.render_rayjob("name: 'Ünïcode Pipeline_v2 with a very very long descriptive name'\n", image=IMAGE)[
        "metadata"
    ]["name"]
    assert len(name) <= kube.MAX_RAYJOB_NAME_LENGTH and kube.dns_label(name) == name
    assert name.startswith("code-pipeline-v2-with") or name[0].isalpha()
    assert kube.default_rayjob_name({}).startswith("secvec-")
    with pytest.raises(ValueError, match="DNS-1035"):
        kube.render_rayjob("name: x\n", name="Bad_Name", image=IMAGE)
    # Two submissions in the same second get different names.
    now = __import__("datetime").datetime(2026, 1, 2, 3, 4, 5)
    names = {kube.default_rayjob_name({"name": "x"}, now=now) for _ in range(20)}
    assert len(names) > 1 and all(n.startswith("x-20260102-030405-") for n in names)


def test_render_raycronjob_is_valid() -> None:
    cron = kube.render_raycronjob(SPEC, schedule="0 3 * * 0", time_zone="UTC", namespace=NAMESPACE, image=IMAGE)
    assert validation_errors([cron]) == []
    assert cron["kind"] == "RayCronJob" and cron["spec"]["schedule"] == "0 3 * * 0"
    assert cron["spec"]["jobTemplate"]["entrypoint"] == "secvec run /config/pipeline.yaml"
    assert cron["metadata"]["name"] == "guarded-finetune"


def test_spec_must_be_a_mapping() -> None:
    for text in ("- a\n- b\n", "just text", "", "a: [unclosed"):
        with pytest.raises(kube.PipelineSpecError):
            kube.render_rayjob(text, name="x")


def test_render_cli_prints_yaml_and_writes_files(cli: typer.Typer, spec_file: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["render", str(spec_file), "-n", NAMESPACE, "--image", "reg.example.com/secvec:1"])
    assert result.exit_code == 0, result.output
    rayjob = yaml.safe_load(result.stdout)
    assert rayjob["metadata"]["namespace"] == NAMESPACE and validation_errors([rayjob]) == []
    out = tmp_path / "cron.yaml"
    args = ["render", str(spec_file), "--image", IMAGE, "--schedule", "*/30 * * * *", "-o", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    cron = yaml.safe_load(out.read_text())
    assert cron["kind"] == "RayCronJob" and validation_errors([cron]) == []


def test_render_cli_node_selector_and_tolerations(cli: typer.Typer, spec_file: Path) -> None:
    args = [
        "render",
        str(spec_file),
        "--image",
        IMAGE,
        "--worker-node-selector",
        "pool=gpu",
        "--worker-toleration",
        "nvidia.com/gpu:NoSchedule",
    ]
    args += ["--worker-toleration", "dedicated=ml:NoExecute"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    worker = yaml.safe_load(result.stdout)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["nodeSelector"] == {"pool": "gpu"}
    assert worker["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"},
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [("- not\n- a mapping\n", "must be a YAML mapping"), ("a: [", "not valid YAML"), (None, "cannot read")],
)
def test_cli_rejects_bad_specs_with_one_line(
    cli: typer.Typer, tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "spec.yaml"
    if content is not None:
        path.write_text(content)
    result = CliRunner().invoke(cli, ["render", str(path)])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_render_through_the_secvec_entry_point(spec_file: Path) -> None:
    entry_point = Path(sys.executable).parent / "secvec"
    command = [str(entry_point)] if entry_point.exists() else [sys.executable, "-m", "workflows.cli"]
    result = subprocess.run(
        [*command, "render", str(spec_file), "--name", "gf-7", "--image", IMAGE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["metadata"]["name"] == "gf-7"


# --- submit and wait ------------------------------------------------------------------------------


def test_submit_posts_a_valid_rayjob_and_prints_its_name(
    cli: typer.Typer, spec_file: Path, kubeconfig: Path, api_server: FakeApiServer
) -> None:
    result = submit(cli, spec_file, kubeconfig, "--name", "gf-42", "--mlflow-tracking-uri", "http://mlflow:5000")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "gf-42"
    (request,) = api_server.requests
    assert request["method"] == "POST"
    assert request["path"] == f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayjobs"
    assert request["headers"].get("authorization") == "Bearer test-token"
    body = request["body"]
    assert body["metadata"] == {**body["metadata"], "name": "gf-42", "namespace": NAMESPACE}
    assert validation_errors([body]) == []
    assert (
        body["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
        == "reg.example.com/secvec:1"
    )


def test_submit_wait_follows_status_to_succeeded(
    cli: typer.Typer, spec_file: Path, kubeconfig: Path, api_server: FakeApiServer
) -> None:
    api_server.statuses = [{}, {"jobDeploymentStatus": "Initializing"}, RUNNING, RUNNING, SUCCEEDED]
    result = submit(cli, spec_file, kubeconfig, "--wait", "--poll-interval", "0.01")
    assert result.exit_code == 0, result.output
    name = result.stdout.strip().splitlines()[0]
    assert name.startswith("guarded-finetune-")
    gets = [r for r in api_server.requests if r["method"] == "GET"]
    assert len(gets) == 5 and gets[0]["path"] == f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayjobs/{name}"
    assert "Running / RUNNING" in result.output and "Complete / SUCCEEDED" in result.output
    assert "succeeded" in result.output


def test_submit_wait_exits_non_zero_when_the_job_fails(
    cli: typer.Typer, spec_file: Path, kubeconfig: Path, api_server: FakeApiServer
) -> None:
    api_server.statuses = [RUNNING, FAILED]
    result = submit(cli, spec_file, kubeconfig, "--wait", "--poll-interval", "0.01")
    assert result.exit_code == 1
    assert "did not succeed: Failed / FAILED (AppFailed)" in result.output


def test_submit_wait_times_out(cli: typer.Typer, spec_file: Path, kubeconfig: Path, api_server: FakeApiServer) -> None:
    api_server.statuses = [RUNNING]
    result = submit(cli, spec_file, kubeconfig, "--wait", "--poll-interval", "0.05", "--timeout", "1")
    assert result.exit_code == 1 and "still Running / RUNNING after 1 s" in result.output


def test_retrying_is_not_final_until_kuberay_says_so(kubeconfig: Path, api_server: FakeApiServer) -> None:
    api_client = kube.load_api_client(kubeconfig=str(kubeconfig))
    kube.submit_rayjob(kube.render_rayjob(SPEC, name="r-1", image=IMAGE), namespace=NAMESPACE, api_client=api_client)
    api_server.statuses = [
        {"jobStatus": "FAILED", "jobDeploymentStatus": "Retrying"},
        RUNNING,
        SUCCEEDED,
    ]
    seen: list[kube.RayJobStatus] = []
    final = kube.wait_for_rayjob("r-1", NAMESPACE, timeout_s=10, poll_s=0.01, api=api_client, on_status=seen.append)
    assert final.succeeded and [s.deployment_status for s in seen] == ["Retrying", "Running", "Complete"]


@pytest.mark.parametrize(
    ("code", "status", "message"),
    [
        (
            403,
            {"reason": "Forbidden", "message": 'rayjobs.ray.io is forbidden: User "x" cannot create'},
            "forbidden (403)",
        ),
        (
            404,
            {"reason": "NotFound", "message": "the server could not find the requested resource"},
            "KubeRay operator installed",
        ),
        (
            404,
            {
                "reason": "NotFound",
                "message": 'namespaces "ml-team" not found',
                "details": {"name": "ml-team", "kind": "namespaces"},
            },
            "namespace 'ml-team' not found",
        ),
        (401, {"reason": "Unauthorized", "message": "Unauthorized"}, "unauthorized (401)"),
    ],
)
def test_submit_reports_api_errors_in_one_line(
    cli: typer.Typer,
    spec_file: Path,
    kubeconfig: Path,
    api_server: FakeApiServer,
    code: int,
    status: dict,
    message: str,
) -> None:
    api_server.post_error = (code, status)
    result = submit(cli, spec_file, kubeconfig)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    errors = [line for line in result.output.strip().splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1, result.output


def test_submit_reports_an_unreachable_cluster(cli: typer.Typer, spec_file: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_kubeconfig(tmp_path / "closed", port)
    result = submit(cli, spec_file, config)
    assert result.exit_code == 1
    assert f"cannot reach the Kubernetes API server at http://127.0.0.1:{port}" in result.output


def test_submit_reports_a_missing_kubeconfig(cli: typer.Typer, spec_file: Path, tmp_path: Path) -> None:
    result = submit(cli, spec_file, tmp_path / "absent")
    assert result.exit_code == 1 and "cannot load Kubernetes credentials" in result.output


def test_submit_with_a_template_keeps_its_cluster(
    cli: typer.Typer, spec_file: Path, kubeconfig: Path, api_server: FakeApiServer, tmp_path: Path
) -> None:
    template = kube.render_rayjob("name: t\nscaling: {num_workers: 2, use_gpu: true}\n", name="t", image=IMAGE)
    template_file = tmp_path / "template.yaml"
    template_file.write_text(kube.to_yaml(template))
    result = submit(cli, spec_file, kubeconfig, "--template", str(template_file))
    assert result.exit_code == 0, result.output
    body = api_server.requests[0]["body"]
    (group,) = body["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 2 and validation_errors([body]) == []
    init = body["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["initContainers"]
    assert len(init) == 1 and init[0]["env"][0]["value"] == SPEC  # the new spec, not the template's
    refused = submit(cli, spec_file, kubeconfig, "--template", str(template_file), "--num-workers", "3")
    assert refused.exit_code == 1 and "drop the sizing" in refused.output


def test_template_patch_is_applied_and_refused_in_one_line_when_it_does_not_fit(
    cli: typer.Typer, spec_file: Path, tmp_path: Path
) -> None:
    template = kube.render_rayjob("name: t\nscaling: {num_workers: 2, use_gpu: true}\n", name="t", image=IMAGE)
    template_file = tmp_path / "template.yaml"
    template_file.write_text(kube.to_yaml(template))
    worker = "/spec/rayClusterSpec/workerGroupSpecs/0"
    patch_file = tmp_path / "patch.yaml"
    patch_file.write_text(
        f"- {{op: test, path: {worker}/groupName, value: gpu-workers}}\n"
        f"- {{op: add, path: {worker}/template/spec/nodeSelector, value: {{pool: a100}}}}\n"
    )
    render = ["render", str(spec_file), "--template", str(template_file)]
    result = CliRunner().invoke(cli, [*render, "--template-patch", str(patch_file)])
    assert result.exit_code == 0, result.output
    (group,) = yaml.safe_load(result.stdout)["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["template"]["spec"]["nodeSelector"] == {"pool": "a100"}
    assert "nodeSelector" not in template["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]

    patch_file.write_text(f"- {{op: test, path: {worker}/groupName, value: cpu-workers}}\n")
    mismatch = CliRunner().invoke(cli, [*render, "--template-patch", str(patch_file)])
    assert mismatch.exit_code == 1 and "does not apply" in mismatch.output
    assert len(mismatch.output.strip().splitlines()) == 1
    patch_file.write_text("op: add\n")
    not_a_list = CliRunner().invoke(cli, [*render, "--template-patch", str(patch_file)])
    assert not_a_list.exit_code == 1 and "list of JSON patch operations" in not_a_list.output
    alone = CliRunner().invoke(cli, ["render", str(spec_file), "--template-patch", str(patch_file)])
    assert alone.exit_code == 1 and "give both" in alone.output


# --- a cluster that can start, and nothing left open --------------------------------------------------

K8S_RAYJOB = REPO_ROOT / "k8s" / "base" / "rayjob.yaml"


def test_cli_requires_an_image_in_a_registry(cli: typer.Typer, spec_file: Path) -> None:
    missing = CliRunner().invoke(cli, ["render", str(spec_file)])
    assert missing.exit_code == 1 and "--image is required" in missing.output
    hub = CliRunner().invoke(cli, ["render", str(spec_file), "--image", "secvec:0.1.0-gpu"])
    assert hub.exit_code == 1 and "names no registry host" in hub.output
    for image in ("localhost:5000/secvec:1", "registry.example.com/ml/secvec@sha256:" + "0" * 64):
        assert kube.render_rayjob(SPEC, name="a", image=image)


def test_every_rendered_pod_passes_pod_security_restricted() -> None:
    rayjob = kube.render_rayjob(SPEC, name="a", image=IMAGE, image_pull_secrets=["regcred"])
    cron = kube.render_raycronjob(SPEC, schedule="0 3 * * 0", image=IMAGE)
    checked = 0
    for obj in (rayjob, cron):
        for where, pod in pod_specs(obj):
            assert pss_restricted_violations(pod) == [], where
            assert pod["automountServiceAccountToken"] is False, where
            checked += 1
    assert checked == 6  # head, workers and submitter of each
    submitter = rayjob["spec"]["submitterPodTemplate"]["spec"]
    assert submitter["imagePullSecrets"] == [{"name": "regcred"}] and submitter["containers"][0]["image"] == IMAGE
    assert submitter["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert "command" not in submitter["containers"][0]  # KubeRay fills in `ray job submit`


def test_pss_check_finds_what_kuberays_default_submitter_pod_lacks() -> None:
    """KubeRay's own submitter pod (no securityContext at all) and common mistakes are each reported."""
    default_submitter = {"restartPolicy": "Never", "containers": [{"name": "ray-job-submitter", "image": IMAGE}]}
    found = " ".join(pss_restricted_violations(default_submitter))
    for rule in ("allowPrivilegeEscalation", "runAsNonRoot", "seccompProfile", "capabilities.drop"):
        assert rule in found
    restricted = kube.submitter_template(IMAGE)["spec"]
    for broken in (
        {"hostNetwork": True},
        {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]},
        {"securityContext": {**restricted["securityContext"], "runAsUser": 0}},
        {"securityContext": {**restricted["securityContext"], "seccompProfile": {"type": "Unconfined"}}},
    ):
        assert pss_restricted_violations({**restricted, **broken}) != [], broken
    added = __import__("copy").deepcopy(restricted)
    added["containers"][0]["securityContext"]["capabilities"]["add"] = ["SYS_ADMIN"]
    assert pss_restricted_violations(added) != []


def test_ray_token_auth_deletion_rules_and_a_start_deadline() -> None:
    spec = kube.render_rayjob(SPEC, name="a", image=IMAGE)["spec"]
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert "shutdownAfterJobFinishes" not in spec  # mutually exclusive with deletionRules in KubeRay 1.7
    rules = {(tuple(sorted(set(r["condition"]) - {"ttlSeconds"})), r["policy"]): r["condition"]["ttlSeconds"]
             for r in spec["deletionStrategy"]["deletionRules"]}  # fmt: skip
    assert {policy for _, policy in rules} == {"DeleteCluster", "DeleteSelf"}
    for condition in ({"jobStatus": "SUCCEEDED"}, {"jobStatus": "FAILED"}, {"jobDeploymentStatus": "Failed"}):
        key = tuple(condition)
        assert rules[(key, "DeleteCluster")] == 600 <= rules[(key, "DeleteSelf")]
    assert spec["preRunningDeadlineSeconds"] == 1800 and spec["activeDeadlineSeconds"] == 86400
    for _, pod in pod_specs({"kind": "RayJob", "spec": spec}):
        assert all(e["name"] != "RAY_AUTH_MODE" for c in pod["containers"] for e in c.get("env", []))


def test_a_spec_using_data_needs_a_claim_mounted_on_every_ray_pod(cli: typer.Typer, tmp_path: Path) -> None:
    data_spec = SPEC + "work_dir: /data/work\n"
    with pytest.raises(ValueError, match="nothing is mounted there"):
        kube.render_rayjob(data_spec, name="a", image=IMAGE)
    rayjob = kube.render_rayjob(data_spec, name="a", image=IMAGE, data_claim="secvec-data")
    for where, pod in pod_specs(rayjob):
        if "submitter" in where:
            continue
        assert {"name": "pipeline-data", "mountPath": "/data"} in pod["containers"][0]["volumeMounts"], where
        assert {"name": "pipeline-data", "persistentVolumeClaim": {"claimName": "secvec-data"}} in pod["volumes"]
    assert kube.check_cluster_spec(kube.parse_pipeline_spec(data_spec), rayjob["spec"]) == []
    path = tmp_path / "spec.yaml"
    path.write_text(data_spec)
    refused = CliRunner().invoke(cli, ["render", str(path), "--image", IMAGE])
    assert refused.exit_code == 1 and "--data-claim" in refused.output
    accepted = CliRunner().invoke(cli, ["render", str(path), "--image", IMAGE, "--data-claim", "secvec-data"])
    assert accepted.exit_code == 0 and "warning" not in accepted.output


@pytest.mark.parametrize(
    ("tracking", "option", "message"),
    [
        ("", None, "no MLflow tracking URI"),
        ("tracking: {tracking_uri: 'sqlite:///.secvec/mlflow.db'}\n", None, "local to one pod"),
        ("tracking: {tracking_uri: mlruns}\n", None, "local to one pod"),
        ("", "http://localhost:5000", "local to one pod"),
        ("", "http://127.0.0.1:5000", "local to one pod"),
    ],
)
def test_cluster_submissions_refuse_local_tracking_uris(
    cli: typer.Typer, tmp_path: Path, tracking: str, option: str | None, message: str
) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("name: local\n" + tracking)
    extra = ["--mlflow-tracking-uri", option] if option else []
    result = CliRunner().invoke(cli, ["render", str(path), "--image", IMAGE, *extra])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    ok = CliRunner().invoke(cli, ["render", str(path), "--image", IMAGE, "--mlflow-tracking-uri", "http://m:5000"])
    assert (ok.exit_code == 0) is (not tracking), ok.output  # a spec's own local URI wins inside the pod


def test_run_again_with_a_template_that_mounts_config_runs_the_given_spec(
    cli: typer.Typer, spec_file: Path, kubeconfig: Path, api_server: FakeApiServer
) -> None:
    """The documented "run again" command: the template mounts the release's ConfigMap at /config; the
    RayJob created must run the spec given on the command line, not the ConfigMap's."""
    result = submit(cli, spec_file, kubeconfig, "--template", str(K8S_RAYJOB))
    assert result.exit_code == 0, result.output
    body = api_server.requests[0]["body"]
    assert validation_errors([body]) == []
    for where, pod in pod_specs(body):
        if "submitter" in where:
            continue
        assert not [v for v in pod["volumes"] if "configMap" in v], where
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["/config"] == "secvec-pipeline" and mounts["/data"] == "pipeline-data", where
        (init,) = pod["initContainers"]
        assert init["env"] == [{"name": "SECVEC_PIPELINE_YAML", "value": SPEC}]


# --- submit --wait on a long run -------------------------------------------------------------------------


def _submitted(kubeconfig: Path, name: str) -> Any:
    api_client = kube.load_api_client(kubeconfig=str(kubeconfig))
    kube.submit_rayjob(kube.render_rayjob(SPEC, name=name, image=IMAGE), namespace=NAMESPACE, api_client=api_client)
    return api_client


def test_wait_treats_validation_failed_as_final(kubeconfig: Path, api_server: FakeApiServer) -> None:
    api_client = _submitted(kubeconfig, "v-1")
    api_server.statuses = [{"jobDeploymentStatus": "ValidationFailed", "reason": "ValidationFailed"}, RUNNING]
    final = kube.wait_for_rayjob("v-1", NAMESPACE, timeout_s=5, poll_s=0.01, api=api_client)
    assert final.finished and not final.succeeded and final.deployment_status == "ValidationFailed"


def test_wait_survives_transient_api_errors_and_slow_replies(
    kubeconfig: Path, api_server: FakeApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube, "REQUEST_TIMEOUT", (2, 0.3))
    api_client = _submitted(kubeconfig, "t-1")
    api_server.get_faults = [("error", 503), ("hang", 1.0), ("error", 429), ("error", 500)]
    api_server.statuses = [RUNNING, SUCCEEDED]
    final = kube.wait_for_rayjob("t-1", NAMESPACE, timeout_s=30, poll_s=0.01, api=api_client)
    assert final.succeeded
    api_server.get_faults = [("error", 403)]  # not transient: reported at once
    with pytest.raises(kube.KubeError, match="forbidden"):
        kube.wait_for_rayjob("t-1", NAMESPACE, timeout_s=30, poll_s=0.01, api=api_client)


def test_wait_reports_a_deleted_rayjob_as_gone(kubeconfig: Path, api_server: FakeApiServer) -> None:
    api_client = _submitted(kubeconfig, "g-1")
    api_server.statuses = [RUNNING]
    api_server.get_faults = [("gone",)]
    with pytest.raises(kube.KubeError, match="is gone") as error:
        kube.wait_for_rayjob("g-1", NAMESPACE, timeout_s=5, poll_s=0.01, api=api_client)
    assert "KubeRay operator installed" not in str(error.value)


def test_the_pipeline_keeps_the_clusters_ray_token_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a RayJob with token auth KubeRay sets RAY_AUTH_MODE=token; the driver must not turn it off when
    it joins the cluster (it used to force RAY_AUTH_MODE=disabled, locking itself out)."""
    import ray

    from workflows import pipeline

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    pipeline.init_ray()
    assert __import__("os").environ["RAY_AUTH_MODE"] == "token"
    assert calls[0]["runtime_env"]["env_vars"].get("RAY_AUTH_MODE") in (None, "token")
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.delenv("RAY_AUTH_MODE")
    pipeline.init_ray()  # the local default keeps auth off (no token file, no warning)
    assert calls[1]["runtime_env"]["env_vars"]["RAY_AUTH_MODE"] == "disabled"
