"""End to end: systemd/install.sh into a throwaway root, and the unit's hardening.

The installer runs with ``--root`` into a temporary directory that holds only the files
``useradd --root`` needs (etc/passwd, group, shadow, gshadow, login.defs): nothing here touches
the host's /etc, /opt or systemd. It installs from a snapshot of the checkout, so that an edit
in the working tree between two runs is not taken for a change the installer made.

Creating a venv and installing numpy, numba and the rest from scratch takes half a minute or
more, so the venv reuses this test run's own site-packages (``--reuse-packages``, an option the
installer documents) and pip installs pybms alone; the installed copy is what the tests import
and run.

The unit is judged by systemd's own tools, offline: ``systemd-analyze security`` (exposure at
or below 2.0, "OK") and ``systemd-analyze verify`` (nothing but the binary that is not
installed on this machine).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
INSTALL = "systemd/install.sh"
UNIT = REPO / "systemd" / "bms.service"
EXAMPLE = "config/pack.example.toml"
# What install.sh reads from its checkout.
CHECKOUT_PARTS = ("pyproject.toml", "README.md", "bms", "drivers", "config", "models", "systemd")
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])
# What systemd and the unit agree on (systemd.unit(5), the paths the unit names).
UNIT_PATH = "etc/systemd/system/bms.service"
VENV = "opt/pybms/venv"
SITE = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
CONFIG = "etc/pybms/pack.toml"
NOLOGIN = "/usr/sbin/nologin"
NOBODY = 65534
# Debian's login.defs: system accounts take IDs below 1000.
SYSTEM_ID_MAX = 999
# pybms's subprocesses must not write bytecode into the root between two listings.
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def make_root(root: Path, groups: dict[str, int]) -> Path:
    """A root with what ``useradd --root`` reads and writes: root's account, ``groups``
    (name: gid) and the ID ranges of login.defs; and a nologin for the shell it checks."""
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text(
        "root:x:0:\n" + "".join(f"{name}:x:{gid}:\n" for name, gid in groups.items())
    )
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\n" + "".join(f"{name}:!::\n" for name in groups))
    (etc / "shadow").chmod(0o640)
    (etc / "gshadow").chmod(0o640)
    (etc / "login.defs").write_text(
        f"SYS_UID_MIN 100\nSYS_UID_MAX {SYSTEM_ID_MAX}\nSYS_GID_MIN 100\n"
        f"SYS_GID_MAX {SYSTEM_ID_MAX}\nUID_MIN 1000\nUID_MAX 60000\nGID_MIN 1000\nGID_MAX 60000\n"
    )
    nologin = root / NOLOGIN.lstrip("/")
    nologin.parent.mkdir(parents=True)
    nologin.write_text("#!/bin/sh\nexit 1\n")
    nologin.chmod(0o755)
    return root


def run_installer(
    *args: str | Path,
    checkout: Path = REPO,
    python: str = sys.executable,
    uid: int | None = None,
):
    """Run ``checkout``'s install.sh with ``args``; ``uid`` runs it as that unprivileged user."""
    command = ["bash", str(checkout / INSTALL), "--python", python, *map(str, args)]
    if uid is not None:
        command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=ENV, cwd="/", check=False
    )


def install(checkout: Path, root: Path):
    return run_installer("--root", root, "--reuse-packages", SITE_PACKAGES, checkout=checkout)


def listing(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: type, mode, owner, mtime and content (hash or link target)."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            else:
                content = None
            key = str(path.relative_to(root))
            entries[key] = (info.st_mode, info.st_uid, info.st_gid, info.st_mtime_ns, content)
    return entries


def table(path: Path) -> dict[str, list[str]]:
    """A passwd or group file: name -> its fields."""
    return {line.split(":")[0]: line.split(":") for line in path.read_text().splitlines()}


def members(root: Path, group: str) -> set[str]:
    field = table(root / "etc/group")[group][3]
    return set(field.split(",")) - {""}


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """The unit's settings, each with its values in order (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A snapshot of the parts of the checkout that install.sh reads."""
    snapshot = tmp_path_factory.mktemp("checkout")
    for part in CHECKOUT_PARTS:
        source = REPO / part
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(source, snapshot / part, ignore=ignore)
        else:
            shutil.copy2(source, snapshot / part)
    return snapshot


@dataclass(frozen=True)
class Installed:
    root: Path
    run: subprocess.CompletedProcess
    checkout: Path


@pytest.fixture(scope="module")
def installed(tmp_path_factory, checkout) -> Installed:
    """A root installed into once, with a dialout group (serial) but no i2c or gpio group."""
    root = make_root(tmp_path_factory.mktemp("install") / "root", {"dialout": 20})
    run = install(checkout, root)
    assert run.returncode == 0, run.stdout + run.stderr
    return Installed(root, run, checkout)


def test_first_run_creates_the_service_user_in_the_bus_groups_that_exist(installed):
    root, run = installed.root, installed.run
    users, groups = table(root / "etc/passwd"), table(root / "etc/group")
    _, _, uid, gid, _, home, shell = users["pybms"]
    assert 0 < int(uid) <= SYSTEM_ID_MAX
    assert gid == groups["pybms"][2]
    assert 0 < int(groups["pybms-admin"][2]) <= SYSTEM_ID_MAX
    assert (home, shell) == ("/var/lib/pybms", NOLOGIN)
    assert members(root, "dialout") == {"pybms"}
    assert members(root, "pybms-admin") == set()  # people are added by the administrator
    assert "no group i2c" in run.stdout and "no group gpio" in run.stdout
    assert "useradd" not in run.stderr, run.stderr


def test_first_run_installs_and_enables_the_unit_where_systemd_looks(installed):
    root = installed.root
    unit = root / UNIT_PATH
    assert unit.read_bytes() == (installed.checkout / "systemd/bms.service").read_bytes()
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    # `enable` links the unit into the .wants/ directory of each target in WantedBy=.
    for target in unit_settings(unit)["WantedBy"]:
        link = root / "etc/systemd/system" / f"{target}.wants" / "bms.service"
        assert link.is_symlink()
        assert os.readlink(link) == "/" + UNIT_PATH


def test_config_is_the_example_readable_by_root_and_the_service_group_only(installed):
    root = installed.root
    config = root / CONFIG
    info = config.stat()
    assert config.read_bytes() == (installed.checkout / EXAMPLE).read_bytes()
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert info.st_uid == 0
    assert info.st_gid == int(table(root / "etc/group")["pybms"][2])


def test_config_names_only_installed_files_and_passes_check_config(installed, tmp_path):
    root = installed.root
    data = tomllib.loads((root / CONFIG).read_text())
    named = [data["pack"]["cell_params"], data["can"]["dbc_file"], data["protection"]["limits"]]
    for path in named:
        assert path.startswith("/opt/pybms/share/"), path
        assert (root / path.lstrip("/")).exists(), f"{path} is not installed"
    for path in (data["protection"]["latch_file"], data["store"]["path"]):
        assert path.startswith("/var/lib/pybms/"), path  # StateDirectory=pybms
    assert data["service"]["control_socket"].startswith("/run/pybms/")  # RuntimeDirectory=pybms
    assert data["service"]["admin_group"] in table(root / "etc/group")
    assert data["can"]["receive_buffer_bytes"] <= rmem_max(root)

    # The installed bms checks it, with the files it names found inside the root.
    text = (root / CONFIG).read_text().replace('"/opt/pybms/', f'"{root}/opt/pybms/')
    rooted = tmp_path / "pack.toml"
    rooted.write_text(text)
    check = subprocess.run(
        [root / VENV / "bin/bms", "check-config", rooted],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=root,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert '"backend": "can"' in check.stdout and '"channel": "can0"' in check.stdout


def rmem_max(root: Path) -> int:
    text = (root / "etc/sysctl.d/60-pybms.conf").read_text()
    return int(re.search(r"^net\.core\.rmem_max\s*=\s*(\d+)$", text, re.MULTILINE).group(1))


def test_venv_runs_the_installed_copy_of_pybms(installed):
    root = installed.root
    venv = root / VENV
    help_run = subprocess.run(
        [venv / "bin/bms", "--help"], capture_output=True, text=True, env=ENV, cwd=root
    )
    assert help_run.returncode == 0, help_run.stderr
    assert "check-config" in help_run.stdout
    where = subprocess.run(
        [venv / "bin/python", "-c", "import bms, drivers; print(bms.__file__, drivers.__file__)"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=root,
        check=True,
    )
    for path in where.stdout.split():
        assert Path(path).is_relative_to(venv / "lib"), path  # not the checkout


@pytest.mark.parametrize("setting", ["ExecStart", "ExecStopPost"])
def test_every_command_of_the_unit_exists_in_the_installed_venv(installed, setting):
    root = installed.root
    for command in unit_settings(root / UNIT_PATH)[setting]:
        binary, subcommand, *_ = command.lstrip("-+!@:").split()
        assert binary == "/" + VENV + "/bin/bms"
        assert f"--config /{CONFIG}" in command  # the file the installer puts in place
        run = subprocess.run(
            [root / binary.lstrip("/"), subcommand, "--help"],
            capture_output=True,
            text=True,
            env=ENV,
            cwd=root,
        )
        assert run.returncode == 0, f"{command}: {run.stderr}"


def test_second_run_changes_nothing_and_says_so(installed):
    root = installed.root
    before = listing(root)
    run = install(installed.checkout, root)
    assert run.returncode == 0, run.stderr
    assert listing(root) == before
    assert "Nothing to do" in run.stdout
    assert not any(line.startswith("+ ") for line in run.stdout.splitlines()), run.stdout
    dry = run_installer("--dry-run", "--root", root, "--reuse-packages", SITE_PACKAGES)
    assert dry.returncode == 0 and "Nothing to do" in dry.stdout, dry.stdout


def test_an_edited_config_is_kept(installed):
    root = installed.root
    config = root / CONFIG
    original, mode = config.read_bytes(), config.stat().st_mode
    edited = original.decode().replace("n_cells = 16 ", "n_cells = 14 ") + "# mine\n"
    assert edited != original.decode() + "# mine\n"
    try:
        config.write_text(edited)
        config.chmod(0o600)
        before = listing(root)
        run = install(installed.checkout, root)
        assert run.returncode == 0, run.stderr
        assert config.read_text() == edited
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert listing(root) == before
        assert "/etc/pybms/pack.toml (kept" in run.stdout
    finally:  # the other tests see the installed config
        config.write_bytes(original)
        config.chmod(mode)


def test_a_changed_source_reinstalls_pybms_and_nothing_else(installed):
    root, checkout = installed.root, installed.checkout
    marker = "# changed after the first install\n"
    module = checkout / "bms" / "__init__.py"
    module.write_text(module.read_text() + marker)  # the snapshot stays changed
    before = listing(root)
    run = install(checkout, root)
    assert run.returncode == 0, run.stderr
    after = listing(root)
    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    assert changed and all(key.startswith(VENV + "/") for key in changed), changed
    assert (root / VENV / SITE / "bms/__init__.py").read_text().endswith(marker)
    assert "+ install pybms" in run.stdout


def test_a_bus_group_that_appears_later_gets_the_service_user(installed):
    root = installed.root
    with (root / "etc/group").open("a") as group:
        group.write("i2c:x:120:\n")
    with (root / "etc/gshadow").open("a") as gshadow:
        gshadow.write("i2c:!::\n")
    run = install(installed.checkout, root)
    assert run.returncode == 0, run.stderr
    assert members(root, "i2c") == {"pybms"}
    assert members(root, "dialout") == {"pybms"}
    assert "+ add user pybms to group i2c" in run.stdout


def test_dry_run_on_an_empty_root_lists_every_action_and_writes_nothing(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    run = run_installer("--dry-run", "--root", root)
    assert run.returncode == 0, run.stderr
    assert list(root.iterdir()) == []
    for action in (
        "would create group pybms",
        "would create group pybms-admin",
        "would create user pybms",
        "would create the venv /opt/pybms/venv",
        "would install pybms",
        "would install /opt/pybms/share/can/pybms.dbc",
        "would install /etc/pybms/pack.toml",
        "would install /etc/systemd/system/bms.service",
        "would enable bms.service",
    ):
        assert action in run.stdout, action
    # each action is followed by its command
    assert f"useradd --root {root} --system" in run.stdout
    assert "nothing was changed" in run.stdout


def test_refuses_to_run_without_root_but_dry_runs(tmp_path):
    root = make_root(tmp_path / "root", {})
    before = listing(root)
    system_python = "/usr/bin/python3"  # the unprivileged user cannot run one under /root
    if os.geteuid() == 0:
        run = run_installer("--root", root, python=system_python, uid=NOBODY)
        dry = run_installer("--dry-run", "--root", root, python=system_python, uid=NOBODY)
    else:
        run = run_installer("--root", root)
        dry = run_installer("--dry-run", "--root", root)
    assert run.returncode != 0
    assert "must run as root" in run.stderr
    assert dry.returncode == 0, dry.stderr
    assert listing(root) == before


def test_a_python_without_venv_is_a_clear_error_that_changes_nothing(tmp_path):
    # Debian's python3 without python3-venv: ensurepip cannot be imported. PYTHONPATH comes
    # before the standard library on sys.path, so a module there stands in for it.
    shadow = tmp_path / "no_ensurepip"
    shadow.mkdir()
    (shadow / "ensurepip.py").write_text("raise ImportError('ensurepip is not installed')\n")
    python = tmp_path / "python3"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={shadow} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    root = make_root(tmp_path / "root", {})
    before = listing(root)
    run = run_installer("--root", root, python=str(python))
    assert run.returncode != 0
    assert "python3-venv" in run.stderr
    assert listing(root) == before


def test_unknown_option_and_start_into_a_root_are_refused(tmp_path):
    root = make_root(tmp_path / "root", {})
    before = listing(root)
    for args in (["--frobnicate"], ["--start", "--root", root]):
        run = run_installer(*args)
        assert run.returncode != 0 and "error" in run.stderr, args
    assert listing(root) == before


def systemd_analyze(*args: str | Path) -> subprocess.CompletedProcess:
    # make test installs it (Makefile: .system-tools); a missing tool is a failure, not a skip
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing (apt-get install systemd)"
    return subprocess.run(
        ["systemd-analyze", *map(str, args)], capture_output=True, text=True, timeout=60
    )


def test_unit_exposure_is_ok(tmp_path):
    # A copy named as installed, away from the checkout's systemd/ directory.
    unit = tmp_path / "bms.service"
    shutil.copy(UNIT, unit)
    run = systemd_analyze("security", "--offline=true", unit)
    output = run.stdout + run.stderr
    found = re.search(r"Overall exposure level for bms\.service: (\d+\.\d+) (\w+)", output)
    assert found, output
    exposure, verdict = float(found.group(1)), found.group(2)
    assert exposure <= 2.0, output
    assert verdict == "OK"
    # It gets there with no capability at all (CapabilityBoundingSet= is empty).
    lines = [line for line in output.splitlines() if "CapabilityBoundingSet=" in line]
    assert lines and not [line for line in lines if line.startswith("✗")], lines


def test_unit_verifies_clean_but_for_the_binary_not_installed_here(tmp_path):
    unit = tmp_path / "bms.service"
    shutil.copy(UNIT, unit)
    run = systemd_analyze("verify", unit)
    missing = re.compile(r"Command /opt/pybms/venv/bin/bms is not executable")
    problems = [line for line in (run.stdout + run.stderr).splitlines() if not missing.search(line)]
    assert problems == [], problems


def test_installer_is_shellcheck_clean():
    assert shutil.which("shellcheck"), "shellcheck is missing (apt-get install shellcheck)"
    run = subprocess.run(["shellcheck", REPO / INSTALL], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout
