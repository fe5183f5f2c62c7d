"""Every cluster YAML passes Ray's own checks, offline: the steps `ray up` runs before it
contacts a cloud (`prepare_config`: merge the provider's defaults, fill node types; then
`validate_config`: Ray's JSON schema and its cross-checks). What comes after needs an account
(resolving AMIs, subnets, key pairs, IAM) and is not checked here."""

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAMLS = sorted((ROOT / "cluster").glob("*.yaml"))
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")
# (CPUs, GPUs) of the instance types used: Ray cannot look them up offline, so the YAMLs state them
INSTANCE_RESOURCES = {"m6i.xlarge": (4, 0), "m6i.2xlarge": (8, 0), "g6e.xlarge": (4, 1), "p5.48xlarge": (192, 8)}


def ray_check(config: dict) -> dict:
    """What `ray up` does to a config before it contacts a cloud; returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_three_clusters_are_shipped():
    assert [p.name for p in CLUSTER_YAMLS] == ["aws-h100-autoscaling.yaml", "cpu-dev.yaml", "onprem-gpu-boxes.yaml"]


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_ray_accepts_it(path):
    config = load(path)
    prepared = ray_check(config)
    for key in COMMAND_KEYS:  # all set here: Ray's defaults would otherwise pip-install a nightly Ray on the nodes
        assert key in config, f"{path.name}: set {key} explicitly"
        assert prepared[key] == config[key]
    assert prepared["docker"]["image"].endswith("/distill:latest")
    assert prepared["docker"]["container_name"] == "distill"


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_token_auth_everywhere(path):
    """Head, workers and the header's client command all use Ray's token, which file_mounts ships to every node."""
    config, text = load(path), path.read_text()
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token ray start" in config[key][-1], key
    assert "RAY_AUTH_MODE=token ray job submit" in text


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_header_commands(path):
    text = path.read_text()
    name = f"cluster/{path.name}"
    for command in (f"ray up {name}", f"ray down {name}", "--working-dir . -- ", "python -m jobs.pipeline --config"):
        assert command in text, command
    for config in re.findall(r"jobs/configs/([\w.-]+\.yaml)", text):  # named configs exist; <CONFIG> is a placeholder
        assert (ROOT / "jobs" / "configs" / config).exists(), config


@pytest.mark.parametrize("path", [p for p in CLUSTER_YAMLS if load(p)["provider"]["type"] == "aws"],
                         ids=lambda p: p.name)
def test_aws_node_types(path):
    config = load(path)
    head_type = config["head_node_type"]
    for name, node in config["available_node_types"].items():
        node_config = node["node_config"]
        cpus, gpus = INSTANCE_RESOURCES[node_config["InstanceType"]]
        assert node["resources"].get("GPU", 0) == gpus, name
        profile = node_config["IamInstanceProfile"]["Arn"]
        if name == head_type:
            assert node["resources"]["CPU"] in (0, cpus), name  # 0: the head only coordinates
            assert profile.endswith(":instance-profile/distill-head")  # may launch workers
            assert "docker" not in node  # no GPUs on the head
        else:
            assert node["resources"]["CPU"] == cpus, name
            assert profile.endswith(":instance-profile/distill-cluster")  # the bucket only
            assert 0 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"]
            assert (node.get("docker", {}).get("worker_run_options") == ["--gpus all"]) == (gpus > 0), name
        assert profile.startswith("arn:aws:iam::<ACCOUNT_ID>:instance-profile/")
    assert config["provider"]["region"] in config["docker"]["image"]


def test_aws_h100_cluster_shape():
    config = load(ROOT / "cluster" / "aws-h100-autoscaling.yaml")
    types = {node["node_config"]["InstanceType"] for node in config["available_node_types"].values()}
    assert {"p5.48xlarge", "g6e.xlarge"} <= types
    assert "availability_zone" in config["provider"] and config["idle_timeout_minutes"] > 0


def test_onprem_boxes_by_address():
    config = load(ROOT / "cluster" / "onprem-gpu-boxes.yaml")
    assert config["provider"]["type"] == "local"
    prepared = ray_check(config)
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["min_workers"] == node_type["max_workers"] == len(config["provider"]["worker_ips"])
    assert "--gpus all" in config["docker"]["run_options"]
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]  # rented boxes: not on the internet


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_no_credentials(path):
    text = path.read_text()
    for secret in (r"AKIA[0-9A-Z]{16}", r"(?i)aws_secret_access_key", r"(?i)aws_access_key_id", r"(?i)token:\s*\S{20,}",
                   r"BEGIN [A-Z ]*PRIVATE KEY"):
        assert not re.search(secret, text), secret


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_every_key_is_commented(path):
    """Each `key:` line has a `# comment` at its end or a comment line right above. Plain list
    items (commands, addresses) are not keys: the key holding the list is commented."""
    lines = path.read_text().splitlines()
    is_key = re.compile(r'^\s*(- )?("[^"]+"|[\w.~/-]+):(\s|$)')
    uncommented = [f"{n + 1}: {line}" for n, line in enumerate(lines)
                   if is_key.match(line) and " #" not in line and not lines[n - 1].strip().startswith("#")]
    assert not uncommented, f"{path.name}: keys without a comment:\n" + "\n".join(uncommented)


# -----------------------------------------------------------------------------
# Broken copies fail with a message that names what is wrong


@pytest.mark.parametrize("break_it, named", [
    (lambda c: c.update(idle_timeout_minute=c.pop("idle_timeout_minutes")), "'idle_timeout_minute' was unexpected"),
    (lambda c: c.update(max_workers="many"), "'many' is not of type 'integer'"),
    (lambda c: c["available_node_types"]["gpu_l40s"].update(min_worker=0), "'min_worker' was unexpected"),
    (lambda c: c["available_node_types"]["gpu_h100x8"].pop("resources"), "'resources' is a required property"),
    (lambda c: c["docker"].update(imagee="x"), "'imagee' was unexpected"),
])
def test_broken_copy_is_refused(break_it, named):
    config = load(ROOT / "cluster" / "aws-h100-autoscaling.yaml")
    break_it(config)
    with pytest.raises(jsonschema.ValidationError) as e:
        ray_check(config)
    assert named in e.value.message


def test_min_workers_over_max_is_refused():
    config = load(ROOT / "cluster" / "aws-h100-autoscaling.yaml")
    config["available_node_types"]["gpu_l40s"]["min_workers"] = 11
    with pytest.raises(ValueError, match="max_workers"):
        ray_check(config)
