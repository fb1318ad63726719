"""deploy/ is safe by default: token auth, a NetworkPolicy, non-root pods and images, no world-writable storage,
and deploy/submit.sh hands every argument to `asyppo train` unchanged.

The manifests are checked as data (no Kubernetes here); submit.sh is run for real against a stand-in for the Ray
dashboard's job API, with Ray's own job client doing the HTTP.
"""

from __future__ import annotations

import http.server
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERAY = DEPLOY / "kuberay"
DOCKERFILES = (DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cpu")
RAY_NODE_LABELS = {"ray.io/is-ray-node": "yes"}  # added by KubeRay to every head and worker pod
UID, GID = 1000, 100


def kuberay_docs() -> list[dict]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def of_kind(kind: str) -> list[dict]:
    return [doc for doc in kuberay_docs() if doc["kind"] == kind]


def cluster_specs() -> list[tuple[str, dict]]:
    specs = [(f"RayCluster {d['metadata']['name']}", d["spec"]) for d in of_kind("RayCluster")]
    specs += [(f"RayJob {d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in of_kind("RayJob")]
    assert len(specs) == 2, specs
    return specs


def ray_pod_templates() -> list[tuple[str, dict]]:
    templates = []
    for name, spec in cluster_specs():
        templates.append((f"{name} head", spec["headGroupSpec"]["template"]))
        templates += [(f"{name} {g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
    return templates


def all_pod_templates() -> list[tuple[str, dict]]:
    submitters = [(f"RayJob {d['metadata']['name']} submitter", d["spec"]["submitterPodTemplate"])
                  for d in of_kind("RayJob")]
    return ray_pod_templates() + submitters


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


# ---------------------------------------------------------------------------------------------- token auth


def test_every_ray_cluster_runs_with_token_auth_from_one_secret():
    for name, spec in cluster_specs():
        auth = spec.get("authOptions") or {}
        assert auth.get("mode") == "token", name
        secret = auth.get("secretName")
        assert secret, f"{name}: the token must come from a Secret the user creates"
        major, minor, *_ = (int(part) for part in spec["rayVersion"].split("."))
        assert (major, minor) >= (2, 52), f"{name}: Ray token authentication needs Ray >= 2.52"
        for template_name, template in ray_pod_templates():
            if not template_name.startswith(name):
                continue
            for container in template["spec"]["containers"]:
                env = env_of(container)
                assert env["RAY_AUTH_MODE"].get("value") == "token", template_name
                ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
                # KubeRay reads the same Secret (key auth_token) for its own dashboard requests.
                assert (ref["name"], ref["key"]) == (secret, "auth_token"), template_name
                assert not ref.get("optional"), f"{template_name}: a missing token must stop the pod"


def test_the_rayjob_cluster_is_the_raycluster():
    (cluster,), (job,) = of_kind("RayCluster"), of_kind("RayJob")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]


def test_headers_state_the_kuberay_version_the_fields_need():
    for path in (KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml"):
        header = path.read_text().split("apiVersion:")[0]
        assert "KubeRay operator >= 1.6.0" in header, path  # authOptions.secretName
        assert ">= 1.1," not in header, path
    assert "1.6.0" in (DEPLOY.parent / "docs" / "deploy.md").read_text()


# ---------------------------------------------------------------------------------------------- NetworkPolicy


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # only what this test understands
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def test_the_network_policy_admits_ray_pods_clients_on_8265_and_prometheus_on_8080():
    (policy,) = of_kind("NetworkPolicy")
    spec = policy["spec"]
    ray_pods = [{**t["metadata"]["labels"], **RAY_NODE_LABELS} for _, t in ray_pod_templates()]
    assert all(selects(spec["podSelector"], labels) for labels in ray_pods)
    assert spec["podSelector"].get("matchLabels"), "an empty selector would cover every pod of the namespace"
    assert spec["policyTypes"] == ["Ingress"]

    rules = spec["ingress"]
    for rule in rules:
        assert rule.get("from"), "a rule without `from` admits everyone"
        for peer in rule["from"]:
            assert set(peer) <= {"podSelector", "namespaceSelector"}, peer  # no ipBlock
            assert all(selector.get("matchLabels") for selector in peer.values()), (
                f"{peer}: an empty selector admits every pod (or every namespace)")

    open_rules = [rule for rule in rules if not rule.get("ports")]
    assert len(open_rules) == 1, "only the Ray pods may use every port"
    (peer,) = open_rules[0]["from"]
    assert peer == {"podSelector": spec["podSelector"]}

    ports = {(p["protocol"], p["port"]) for rule in rules if rule.get("ports") for p in rule["ports"]}
    assert ports == {("TCP", 8265), ("TCP", 8080)}

    (dashboard,) = [rule for rule in rules if rule.get("ports") == [{"protocol": "TCP", "port": 8265}]]
    client = {"podSelector": {"matchLabels": {"asyppo/ray-client": "true"}}}
    operator = {"app.kubernetes.io/name": "kuberay-operator"}  # the KubeRay Helm chart's pod label
    assert client in dashboard["from"]
    # Anyone else on 8265 is the operator (it polls the job API of a RayJob's cluster).
    assert all(peer == client or peer["podSelector"]["matchLabels"] == operator for peer in dashboard["from"])
    # The RayJob's submitter pod must be let through, or the job is never submitted.
    for job in of_kind("RayJob"):
        assert selects(client["podSelector"], job["spec"]["submitterPodTemplate"]["metadata"]["labels"])

    (metrics,) = [rule for rule in rules if rule.get("ports") == [{"protocol": "TCP", "port": 8080}]]
    (monitor,) = of_kind("PodMonitor")
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": monitor["metadata"]["namespace"]}}}]


# ---------------------------------------------------------------------------------------------- non-root


def test_every_pod_runs_as_the_images_non_root_user():
    for name, template in all_pod_templates():
        pod = template["spec"].get("securityContext") or {}
        assert pod.get("runAsNonRoot") is True, name
        assert (pod.get("runAsUser"), pod.get("runAsGroup")) == (UID, GID), name
        for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            context = container.get("securityContext") or {}
            assert context.get("allowPrivilegeEscalation") is False, f"{name}/{container['name']}"
            assert not context.get("privileged"), f"{name}/{container['name']}"
            assert "ALL" in context.get("capabilities", {}).get("drop", []), f"{name}/{container['name']}"
            assert context.get("runAsUser", UID) != 0, f"{name}/{container['name']}"
    for name, template in ray_pod_templates():
        assert template["spec"]["securityContext"].get("fsGroup") == GID, f"{name}: /shared needs group ownership"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments): comment lines dropped (as Docker does, also inside a continued instruction),
    continuation lines joined."""
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    lines = [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines() if line.strip()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_end_as_the_non_root_user(path):
    instructions = dockerfile_instructions(path)
    users = [(i, args) for i, (op, args) in enumerate(instructions) if op == "USER"]
    assert users, f"{path.name}: no USER"
    last_index, last_user = users[-1]
    # Numeric, so that Kubernetes' runAsNonRoot can verify it, and the ids the pod templates use. Being the last
    # USER, it comes after every step that runs as root.
    assert last_user == f"{UID}:{GID}", path.name
    if path.name == "Dockerfile":  # Ray's base image gives its `ray` user passwordless sudo; the image drops it
        assert any(op == "RUN" and "/etc/sudoers" in args for op, args in instructions[:last_index])
    if path.name == "Dockerfile.cpu":
        assert any(op == "RUN" and f"--uid {UID}" in args and f"--gid {GID}" in args
                   for op, args in instructions[:last_index]), "the user must exist with the fixed ids"
        (copy,) = [args for op, args in instructions if op == "COPY"]
        assert copy.startswith(f"--chown={UID}:{GID} ")


# ---------------------------------------------------------------------------------------------- storage


def grants_others_write(mode: str) -> bool:
    if re.fullmatch(r"[0-7]{3,4}", mode):
        return bool(int(mode[-1]) & 2)
    for clause in mode.split(","):  # symbolic: [ugoa]*[+=][rwxXst]*; no `who` means everyone (minus umask)
        match = re.fullmatch(r"([ugoa]*)([+=])([rwxXst]*)", clause)
        if match and "w" in match.group(3) and (not match.group(1) or set(match.group(1)) & {"o", "a"}):
            return True
    return False


def world_writable_chmods(text: str) -> list[str]:
    return [match.group(0) for match in re.finditer(r"\bchmod\s+(?:-[A-Za-z]+\s+)*(\S+)", text)
            if grants_others_write(match.group(1))]


def test_the_world_writable_detector():
    assert world_writable_chmods("sudo chmod 777 /shared") == ["chmod 777"]
    assert world_writable_chmods("chmod -R a+w /shared; chmod o+rw x; chmod +w y") == [
        "chmod -R a+w", "chmod o+rw", "chmod +w"]
    assert world_writable_chmods("chmod 2770 /shared && chmod g+w x && chmod 755 y && chmod o-w z") == []


def strings_in(node) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings_in(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings_in(value)]
    return [node] if isinstance(node, str) else []


def test_nothing_makes_a_directory_world_writable():
    texts = {}
    for path in [*KUBERAY.glob("*.yaml"), DEPLOY / "ray-cluster.yaml"]:
        texts[path.name] = "\n".join(s for doc in yaml.safe_load_all(path.read_text()) for s in strings_in(doc))
    for path in [*DOCKERFILES, DEPLOY / "submit.sh"]:
        texts[path.name] = "\n".join(line for line in path.read_text().splitlines()
                                     if not line.lstrip().startswith("#"))
    assert "chmod" in texts["ray-cluster.yaml"]  # the detector does see the commands
    for name, text in texts.items():
        assert world_writable_chmods(text) == [], name
    shared = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())["initialization_commands"]
    assert any(f"chown {UID}:{GID} /shared" in command for command in shared)


def test_the_ray_up_cluster_runs_with_token_auth():
    cluster = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [command for command in cluster[key] if "ray start" in command]
        assert starts and all("RAY_AUTH_MODE=token" in command.split("ray start")[0] for command in starts), key
    assert cluster["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


def test_the_example_jobs_node_types_are_worker_groups_with_room_for_their_roles():
    """deploy/configs/cluster-5gpu.yaml pins each role to a node type (docs/scaling.md); every cluster in deploy/ has a
    worker group (KubeRay) or node type (`ray up`) carrying that resource, KubeRay's groups start with the GPUs
    their roles need, and may grow to hold as many actors as their ranges allow (rollout.num_workers)."""
    from collections import Counter

    from asyppo.cluster.actor_group import role_resources
    from asyppo.common.config import load_config

    gpus_needed: Counter[str] = Counter()
    gpus_at_most: Counter[str] = Counter()
    for resources in role_resources(load_config(DEPLOY / "configs" / "cluster-5gpu.yaml")).values():
        assert resources.node_type, "every role of the cluster example names its node type"
        gpus_needed[resources.node_type] += resources.count * resources.gpus
        gpus_at_most[resources.node_type] += (resources.count + resources.spare) * resources.gpus
    assert set(gpus_needed) == {"rollout_node", "train_node"}
    assert gpus_at_most["rollout_node"] > gpus_needed["rollout_node"]  # the example's rollout workers are a range
    for name, spec in cluster_specs():
        gpus_started: Counter[str] = Counter()
        gpus_grown: Counter[str] = Counter()
        for group in spec["workerGroupSpecs"]:
            # KubeRay passes the value to `ray start --resources`: a JSON object inside YAML and shell quotes.
            (node_type,) = json.loads(group["rayStartParams"]["resources"].strip('"').replace('\\"', '"'))
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            gpus_started[node_type] += group["minReplicas"] * int(limits["nvidia.com/gpu"])
            gpus_grown[node_type] += group["maxReplicas"] * int(limits["nvidia.com/gpu"])
            assert group["maxReplicas"] >= group["minReplicas"] >= 1, f"{name} {group['groupName']}"
        assert all(gpus_started[kind] >= gpus for kind, gpus in gpus_needed.items()), (name, gpus_started)
        assert all(gpus_grown[kind] >= gpus for kind, gpus in gpus_at_most.items()), (name, gpus_grown)
    ray_up = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    carried = {kind for node in ray_up["available_node_types"].values() if node.get("min_workers", 0) >= 1
               for kind in node["resources"]}
    assert set(gpus_needed) <= carried


# ---------------------------------------------------------------------------------------------- submit.sh


class FakeDashboard(http.server.ThreadingHTTPServer):
    """The part of the Ray dashboard's REST API that a job submission uses, with token authentication."""

    def __init__(self, token: str | None):
        super().__init__(("127.0.0.1", 0), FakeDashboardHandler)
        self.token = token
        self.jobs: list[dict] = []
        self.requests: list[tuple[str, str, str | None]] = []

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeDashboardHandler(http.server.BaseHTTPRequestHandler):
    server: FakeDashboard

    def log_message(self, *args):
        pass

    def reply(self, status: int, body) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        auth = self.headers.get("Authorization")
        self.server.requests.append((self.command, self.path, auth))
        if self.server.token is not None and auth != f"Bearer {self.server.token}":
            return self.reply(401 if auth is None else 403, "Unauthorized: Missing authentication token")
        if self.command == "GET" and self.path == "/api/version":
            return self.reply(200, {"version": "4", "ray_version": importlib.metadata.version("ray"),
                                    "ray_commit": "test", "session_name": "test"})
        if self.path.startswith("/api/packages/"):
            return self.reply(404 if self.command == "GET" else 200, "")
        if self.command == "POST" and self.path == "/api/jobs/":
            self.server.jobs.append(json.loads(body))
            return self.reply(200, {"job_id": "raysubmit_test", "submission_id": "raysubmit_test"})
        return self.reply(404, "not found")

    do_GET = do_PUT = do_POST = serve


@pytest.fixture
def dashboard(request):
    server = FakeDashboard(token=request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


FAKE_ASYPPO = """#!{python}
import json, os, sys
with open(os.environ["FAKE_ASYPPO_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
"""

# `ray job submit` of Ray releases before ray-project/ray#63797 (pyproject.toml allows ray >= 2.40) joins the words
# after `--` with subprocess.list2cmdline, which leaves `;`, `$(...)` and backquotes to the cluster's shell. The
# previous submit.sh handed its arguments to that command; with this stand-in on PATH the test fails for it.
FAKE_OLD_RAY_CLI = """#!{python}
import json, os, subprocess, sys, urllib.request, yaml
args = sys.argv[1:]
split = args.index("--")
options, entrypoint = args[:split], args[split + 1:]
address = options[options.index("--address") + 1]
with open(options[options.index("--runtime-env") + 1]) as handle:
    runtime_env = yaml.safe_load(handle)
headers = {{"Content-Type": "application/json"}}
if os.environ.get("RAY_AUTH_TOKEN"):
    headers["Authorization"] = "Bearer " + os.environ["RAY_AUTH_TOKEN"]
body = json.dumps({{"entrypoint": subprocess.list2cmdline(entrypoint), "runtime_env": runtime_env}}).encode()
urllib.request.urlopen(urllib.request.Request(address + "/api/jobs/", body, headers, method="POST"))
"""


def fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("asyppo", FAKE_ASYPPO), ("ray", FAKE_OLD_RAY_CLI)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_submit(tmp_path: Path, address: str, args: list[str], **env) -> subprocess.CompletedProcess:
    base = {
        "PATH": f"{fake_bin(tmp_path)}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),  # no ~/.ray/auth_token of the person running the tests
        "PYTHON": sys.executable,
        "FAKE_ASYPPO_LOG": str(tmp_path / "asyppo-calls.jsonl"),
        "NO_PROXY": "127.0.0.1,localhost",
        "LANG": "C.UTF-8",
    }
    (tmp_path / "home").mkdir()
    return subprocess.run(["bash", str(DEPLOY / "submit.sh"), "--address", address, "--no-wait", "--", *args],
                          env={**base, **env}, cwd=tmp_path, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("dashboard", ["s3cr3t-token"], indirect=True)
def test_submit_passes_each_argument_unchanged_and_sends_the_token(dashboard, tmp_path):
    marks = [tmp_path / f"pwned-{i}" for i in range(3)]
    args = [
        "--config", "deploy/configs/cluster-5gpu.yaml",
        f"trainer.name=a;touch {marks[0]}",
        f"trainer.tag=$(touch {marks[1]})",
        f"trainer.note=`touch {marks[2]}`",
        """trainer.title=it's a "quoted" value  with  spaces""",
        "trainer.multi=line1\nline2",
        "",
        "--resume",
    ]
    result = run_submit(tmp_path, dashboard.address, args, RAY_AUTH_TOKEN="s3cr3t-token")
    assert result.returncode == 0, result.stderr

    (job,) = dashboard.jobs
    assert shlex.split(job["entrypoint"]) == ["asyppo", "train", *args]
    # What the cluster does with it: Ray's job supervisor runs the entrypoint with /bin/sh -c.
    calls = tmp_path / "asyppo-calls.jsonl"
    local = [json.loads(line) for line in calls.read_text().splitlines()]
    assert local == [["config", *[a for a in args if a != "--resume"]]]  # submit.sh's local config check
    calls.unlink()
    subprocess.run(["/bin/sh", "-c", job["entrypoint"]], check=True, cwd=tmp_path, timeout=30, env={
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "FAKE_ASYPPO_LOG": str(calls)})
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [["train", *args]]
    assert not [mark for mark in marks if mark.exists()], "an argument was run as a shell command"
    assert result.stdout.strip() == "raysubmit_test"  # the job id, for scripts

    # Every request carried the token; the token is not in the job's runtime env (the dashboard shows that).
    assert dashboard.requests and all(auth == "Bearer s3cr3t-token" for _, _, auth in dashboard.requests)
    assert "s3cr3t-token" not in json.dumps(job)
    assert job["runtime_env"]["env_vars"]["VLLM_NO_USAGE_STATS"] == "1"


@pytest.mark.parametrize("dashboard", ["s3cr3t-token"], indirect=True)
def test_submit_without_the_token_is_refused(dashboard, tmp_path):
    result = run_submit(tmp_path, dashboard.address, ["trainer.steps=1"])
    assert result.returncode != 0
    assert "token" in result.stderr.lower()
    assert dashboard.jobs == []


@pytest.mark.parametrize("dashboard", ["s3cr3t-token"], indirect=True)
def test_submit_sh_forwards_the_same_variables_as_asyppo_submit(dashboard, tmp_path):
    from asyppo.cluster.cli import FORWARDED_ENV_VARS

    shell = {name: f"value-of-{name}" for name in FORWARDED_ENV_VARS}
    result = run_submit(tmp_path, dashboard.address, ["trainer.steps=1"], RAY_AUTH_TOKEN="s3cr3t-token",
                        WANDB_PROJECT="not-forwarded", **shell)
    assert result.returncode == 0, result.stderr
    (job,) = dashboard.jobs
    forwarded = {name: value for name, value in job["runtime_env"]["env_vars"].items() if name.startswith("WANDB")}
    assert forwarded == shell


def test_the_grafana_dashboard_is_current_and_shows_only_logged_metrics():
    """deploy/grafana/asyppo-dashboard.json is what make_dashboard.py writes, and every panel's key is one the driver
    logs each step (required_metric_keys for a job with σ and every optional key the code can add)."""
    import importlib.util

    from asyppo.common.config import build_config
    from asyppo.cluster.metrics import required_metric_keys

    spec = importlib.util.spec_from_file_location("make_dashboard", DEPLOY / "grafana" / "make_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert json.loads((DEPLOY / "grafana" / "asyppo-dashboard.json").read_text()) == module.dashboard()
    logged = set(required_metric_keys(build_config(overrides=["critics.num_critics=4"])))
    logged |= {"pg_loss", "lr"}  # in every step's record besides the required ones
    assert set(module.panel_keys()) <= logged, set(module.panel_keys()) - logged
