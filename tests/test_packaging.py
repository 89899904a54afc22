"""What an operator installs: example configs, systemd units, sysusers, firewalld
services and the RPM specs — checked with the real loaders and the real tools."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from helexa.core.settings import load_settings
from helexa.cortex.config import load_config
from helexa.neuron.config import NeuronSettings, RpcSettings
from tests.support.procs import console_script

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(PACKAGING / "systemd" / name)
    return parser


def test_example_configs_load_through_the_real_loaders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")  # models_config must resolve next to cortex.toml, not the cwd
    cortex = load_config(PACKAGING / "config" / "cortex.toml")
    assert [n.name for n in cortex.settings.neurons] == ["beast", "benjy"]
    assert cortex.catalogue.resolve("helexa/balanced") == "Qwen/Qwen3-8B"
    assert cortex.catalogue.models["Qwen/Qwen3-8B-GGUF"].quant == "Q4_K_M"
    neuron = load_settings(NeuronSettings, PACKAGING / "config" / "neuron.toml")
    assert neuron.port == 13131 and neuron.default_models[0].model_id == "Qwen/Qwen3-8B"
    assert neuron.drain_timeout_s < 120  # inside the unit's TimeoutStopSec


def test_units_carry_the_required_directives() -> None:
    neuron = unit("neuron.service")["Service"]
    assert neuron["ExecStart"] == "/usr/bin/neuron --config /etc/neuron/neuron.toml"
    assert (neuron["User"], neuron["Group"]) == ("neuron", "neuron")
    assert neuron["StateDirectory"] == "neuron"
    assert neuron["TimeoutStartSec"] == "1800s" and neuron["TimeoutStopSec"] == "120s"
    assert neuron["KillSignal"] == "SIGTERM" and neuron["Restart"] == "on-failure"
    assert neuron["NoNewPrivileges"] == "yes" and neuron["ProtectSystem"] == "strict"
    for breaks_cuda in ("PrivateDevices", "MemoryDenyWriteExecute", "DevicePolicy"):
        assert breaks_cuda not in neuron
    cortex = unit("cortex.service")["Service"]
    assert cortex["ExecStart"] == "/usr/bin/cortex serve --config /etc/cortex/cortex.toml"
    assert (cortex["User"], cortex["Group"]) == ("cortex", "cortex")
    assert cortex["NoNewPrivileges"] == "yes" and cortex["ProtectSystem"] == "strict"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
@pytest.mark.parametrize("name", ["neuron", "cortex"])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, name: str) -> None:
    """Verified as shipped, only ExecStart pointed at the installed console script
    (verify insists the binary exists)."""
    text = (PACKAGING / "systemd" / f"{name}.service").read_text()
    copy = tmp_path / f"{name}.service"
    copy.write_text(text.replace(f"/usr/bin/{name}", console_script(name)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


def test_sysusers_make_two_separate_users() -> None:
    entries = {}
    for path in (PACKAGING / "sysusers.d").glob("*.conf"):
        for line in path.read_text().splitlines():
            fields = line.split()
            if fields and fields[0] == "u":
                entries[fields[1]] = fields
    assert set(entries) == {"cortex", "neuron"}
    assert entries["cortex"][-2] == "/var/lib/cortex"
    assert entries["neuron"][-2] == "/var/lib/neuron"


def test_firewalld_services() -> None:
    def ports(name: str) -> set[str]:
        tree = ET.parse(PACKAGING / "firewalld" / name)
        return {f"{p.get('port')}/{p.get('protocol')}" for p in tree.getroot().iter("port")}

    assert ports("cortex.xml") == {"31313/tcp", "31314/tcp"}
    assert ports("helexa-neuron.xml") == {"13131/tcp"}
    # The RPC ports of pooling match the neuron's default range, and only the fleet zone
    # (whose sources the operator names) opens them: ggml RPC has no authentication.
    assert ports("helexa-rpc.xml") == {"50052-50099/tcp"}
    assert RpcSettings().ports == (50052, 50099)
    zone = ET.parse(PACKAGING / "firewalld" / "helexa-fleet-zone.xml").getroot()
    assert zone.tag == "zone" and zone.get("target") is None  # default: reject the rest
    assert {s.get("name") for s in zone.iter("service")} == {"helexa-neuron", "helexa-rpc"}
    spec = (PACKAGING / "rpm" / "helexa-neuron.spec").read_text()
    assert "firewalld/zones/helexa-fleet.xml" in spec and "services/helexa-rpc.xml" in spec


def source_tarball(dest: Path) -> Path:
    files = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    tarball = dest / "helexa-0.1.0.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        for name in filter(None, files):
            if (ROOT / name).exists():
                archive.add(ROOT / name, arcname=f"helexa-0.1.0/{name}")
    return tarball


@pytest.mark.skipif(shutil.which("rpmbuild") is None, reason="rpmbuild missing")
@pytest.mark.parametrize("spec", ["cortex.spec", "helexa-neuron.spec"])
def test_rpm_source_packages_build(tmp_path: Path, spec: str) -> None:
    top = tmp_path / "rpmbuild"
    (top / "SOURCES").mkdir(parents=True)
    source_tarball(top / "SOURCES")
    result = subprocess.run(
        ["rpmbuild", "-bs", "--define", f"_topdir {top}", str(PACKAGING / "rpm" / spec)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    built = list((top / "SRPMS").glob("*.src.rpm"))
    assert len(built) == 1 and built[0].name.startswith(spec.removesuffix(".spec") + "-0.1.0")


def test_containerfiles_run_the_daemons() -> None:
    cortex = (PACKAGING / "containers" / "Containerfile.cortex").read_text()
    neuron = (PACKAGING / "containers" / "Containerfile.neuron").read_text()
    assert '"cortex", "serve", "--config", "/etc/cortex/cortex.toml"' in cortex
    assert '".[neuron]"' in neuron and '"neuron", "--config"' in neuron


@pytest.mark.parametrize("name", ["neuron.service", "cortex.service"])
def test_units_allow_many_open_files(name: str) -> None:
    """Each stream holds sockets: 1 024 open files failed 992 of 1 000 concurrent streams."""
    assert int(unit(name)["Service"]["LimitNOFILE"]) >= 65536


def test_release_tarball_script_builds_what_the_specs_unpack(tmp_path: Path) -> None:
    """The command the README documents: helexa-VERSION.tar.gz holding helexa-VERSION/."""
    result = subprocess.run(
        [str(ROOT / "scripts" / "release-tarball.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for spec in ("cortex.spec", "helexa-neuron.spec"):
        text = (PACKAGING / "rpm" / spec).read_text()
        assert "Source0:        helexa-%{version}.tar.gz" in text
        assert "%autosetup -n helexa-%{version}" in text
    tarball = tmp_path / "helexa-0.1.0.tar.gz"
    assert result.stdout.strip() == str(tarball)
    with tarfile.open(tarball) as archive:
        names = set(archive.getnames())
    for needed in ("pyproject.toml", "packaging/rpm/cortex.spec", "src/helexa/__init__.py"):
        assert f"helexa-0.1.0/{needed}" in names
