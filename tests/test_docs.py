"""The README and docs/ describe the code as it is: the two set-up commands exist as written
(the second is CI itself, `.ci/run`, so its pieces are checked rather than run again), links
resolve, cache paths agree with the code, and what a newcomer needs is written down."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def first_commands() -> list[str]:
    """The commands of the README's first ```bash block, comments dropped."""
    block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S)
    assert block, "README has no ```bash block"
    lines = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line]


def test_the_two_setup_commands_are_what_the_repo_runs() -> None:
    assert first_commands()[:2] == [
        "scripts/dev.sh setup && .venv/bin/cortex up",
        "scripts/dev.sh test",
    ]
    dev = ROOT / "scripts" / "dev.sh"
    assert dev.is_file() and dev.stat().st_mode & 0o111
    text = dev.read_text()
    assert re.search(r"^\s*setup\)", text, re.M) and re.search(r"^\s*test\)", text, re.M)
    assert "VENV=${VENV:-.venv}" in text  # .venv/bin/cortex is where setup puts it
    assert 'pip_q -e ".[neuron]"' in text  # setup installs the inference stack `up` needs
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec scripts/dev.sh test" in ci  # CI is exactly the README's second command
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["cortex"] == "helexa.cortex.cli:main"
    from helexa.cortex.cli import app

    assert "up" in {c.name or c.callback.__name__ for c in app.registered_commands}


def test_no_pointer_to_files_users_cannot_see() -> None:
    for path in [README, *DOCS]:
        text = path.read_text()
        assert "SPEC.md" not in text and "../shared" not in text, path


def headings(path: Path) -> set[str]:
    """GitHub's anchors for the headings of ``path``."""
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    for target in re.findall(r"\]\(([^)]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.name}: {target}"
        if anchor:
            assert anchor in headings(linked), f"{path.name}: {target}"


def test_cache_paths_agree_with_the_code() -> None:
    from helexa.neuron.model_files import hf_cache_dir

    assert hf_cache_dir(None, {"HOME": "/h"}).parts[-3:] == (".cache", "huggingface", "hub")
    assert hf_cache_dir(None, {"HF_HOME": "/x"}) == Path("/x/hub")
    assert hf_cache_dir(None, {"HF_HUB_CACHE": "/y", "HF_HOME": "/x"}) == Path("/y")
    neuron = (ROOT / "docs" / "neuron.md").read_text()
    assert "HF_HUB_CACHE,\n" in neuron and "HF_HOME/hub, ~/.cache/huggingface/hub" in neuron
    # Under systemd: HOME is the state directory, so the default cache is inside it.
    unit = (ROOT / "packaging" / "systemd" / "neuron.service").read_text()
    assert "Environment=HOME=/var/lib/neuron" in unit
    systemd_cache = "/var/lib/neuron/.cache/huggingface/hub"
    for path in (README, ROOT / "docs" / "neuron.md", ROOT / "packaging/config/neuron.toml"):
        assert systemd_cache in path.read_text(), path
    readme = README.read_text()
    assert "`~/.cache/huggingface/hub`" in readme
    for path in [README, *DOCS]:  # no other spelling of the default
        assert "/var/lib/neuron/hub" not in path.read_text(), path


def test_what_a_newcomer_needs_is_written_down() -> None:
    readme = README.read_text()
    cortex = (ROOT / "docs" / "cortex.md").read_text()
    neuron = (ROOT / "docs" / "neuron.md").read_text()
    for route in ("/v1/messages", "/v1/messages/count_tokens", "/v1/responses"):
        assert f"`POST {route}" in cortex or f"`{route}`" in cortex, route
    assert "## cortex up" in cortex and "--tiny" in cortex and "random text" in cortex
    assert "cortex check-config [PATH]" in cortex and "neuron check-config [PATH]" in neuron
    assert "min_devices = 0" in readme and "min_devices = 0" in cortex
    assert "min_devices = 0" in neuron
    assert "## Local models (`model_dirs`)" in neuron
    assert "scripts/release-tarball.sh" in readme
    assert (ROOT / "scripts" / "release-tarball.sh").stat().st_mode & 0o111
    assert "~/.local/state/helexa/up" in readme and "~/.local/state/helexa/up" in cortex
    assert "helexa.neuron.access" in neuron
