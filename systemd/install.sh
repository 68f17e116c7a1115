#!/usr/bin/env bash
# Install pybms as a systemd service from the checkout this script is in.
#
# Creates the system user `pybms` (in the bus groups this system has) and the group
# `pybms-admin`, a venv in /opt/pybms/venv with pybms in it, the DBC, limit sets and cell
# parameter sets in /opt/pybms/share, /etc/pybms/pack.toml from config/pack.example.toml (only
# if there is none), net.core.rmem_max for the CAN receive buffer, and the unit, enabled.
# It starts nothing unless asked (--start), and never restarts a running service: a restart
# opens the contactors. Idempotent: a second run changes nothing and says so.
# See systemd/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: install.sh [--dry-run] [--root DIR] [--start] [--python PYTHON]
                  [--reuse-packages SITE_PACKAGES]

  --dry-run        print every action with its command; change nothing (no root needed)
  --root DIR       install into DIR instead of / (for tests and inspection: useradd --root,
                   systemctl --root; the venv's scripts then name DIR in their paths, so the
                   tree does not run once copied to /)
  --start          start bms.service once installed (not with --root)
  --python PYTHON  the interpreter the venv is made from (default: python3; 3.11 or newer)
  --reuse-packages SITE_PACKAGES
                   let the venv use the packages already in this site-packages directory (of
                   another venv of the same Python) instead of installing numpy, numba and
                   the rest again; pip then installs pybms and only what is missing. The venv
                   keeps depending on that directory. The tests use it to stay fast.
EOF
}

die() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}

SRC=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
ARGS=("$@")
ROOT=/
DRY_RUN=0
START=0
PYTHON=python3
REUSE=

while (($#)); do
    case $1 in
    --dry-run) DRY_RUN=1 ;;
    --start) START=1 ;;
    --root | --python | --reuse-packages)
        (($# >= 2)) || die "$1 needs a value"
        case $1 in
        --root) ROOT=$2 ;;
        --python) PYTHON=$2 ;;
        --reuse-packages) REUSE=$2 ;;
        esac
        shift
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        die "unknown argument: $1"
        ;;
    esac
    shift
done

# Files and directories this creates must be readable by the service user whatever the
# caller's umask (pack.toml and the venv alike).
umask 022

PREFIX=/opt/pybms
VENV=$PREFIX/venv
SHARE=$PREFIX/share
CONFIG=/etc/pybms/pack.toml
UNIT_NAME=bms.service
UNIT=/etc/systemd/system/$UNIT_NAME
SYSCTL=/etc/sysctl.d/60-pybms.conf
SERVICE_USER=pybms
ADMIN_GROUP=pybms-admin
# Groups of the bus device nodes: dialout (serial: ttyS, ttyAMA, ttyUSB, ttyACM; Debian's
# udev), i2c (/dev/i2c-*: Debian's i2c-tools, Raspberry Pi OS), gpio (/dev/gpiochip*:
# Raspberry Pi OS and BeagleBoard images; plain Debian has none).
BUS_GROUPS=(dialout i2c gpio)
# The CAN receive buffer of [can] receive_buffer_bytes in config/pack.example.toml: without
# CAP_NET_ADMIN (the unit grants none) SO_RCVBUF is capped by net.core.rmem_max.
RMEM_MAX_BYTES=4194304
# What goes into the venv: the package, the metadata pip builds it from.
PACKAGE_FILES=(pyproject.toml README.md bms drivers)

[[ $ROOT == /* ]] || ROOT=$PWD/$ROOT
ROOT=$(realpath -m -- "$ROOT")
ON_HOST=0
[[ $ROOT == / ]] && ON_HOST=1
ROOT_OPT=() # for useradd, groupadd, usermod
SYSTEMCTL=(systemctl)
if ((!ON_HOST)); then
    ROOT_OPT=(--root "$ROOT")
    SYSTEMCTL=(systemctl "--root=$ROOT")
fi

# A path inside the root being installed into.
r() {
    if ((ON_HOST)); then printf '%s' "$1"; else printf '%s%s' "$ROOT" "$1"; fi
}

CHANGES=0

# act DESCRIPTION [--shows TEXT] COMMAND [ARG...]: run an action, or under --dry-run print it
# with its command (TEXT for a function of this script: what it runs).
act() {
    local what=$1 shows=
    shift
    if [[ $1 == --shows ]]; then
        shows=$2
        shift 2
    fi
    CHANGES=$((CHANGES + 1))
    if ((DRY_RUN)); then
        printf 'would %s\n' "$what"
        if [[ -n $shows ]]; then
            printf '    $ %s\n' "$shows"
        else
            printf '    $'
            printf ' %q' "$@"
            printf '\n'
        fi
        return 0
    fi
    printf '+ %s\n' "$what"
    "$@"
}

same() {
    printf '= %s\n' "$*"
}

note() {
    printf '! %s\n' "$*"
}

# The /etc/group line of a group in the root, or nothing.
group_line() {
    if ((ON_HOST)); then
        getent group "$1" || true
    else
        grep -E "^$1:" "$(r /etc/group)" 2>/dev/null || true
    fi
}

user_exists() {
    if ((ON_HOST)); then
        getent passwd "$1" >/dev/null
    else
        grep -qE "^$1:" "$(r /etc/passwd)" 2>/dev/null
    fi
}

# Whether user $2 is a listed member of group $1.
is_member() {
    local members
    members=$(group_line "$1" | cut -d: -f4)
    [[ ",$members," == *",$2,"* ]]
}

# install_file SOURCE DESTINATION MODE [LABEL]: copy when missing or different, fix a wrong
# mode. LABEL stands for SOURCE in what --dry-run prints (generated content).
install_file() {
    local src=$1 dst=$2 mode=$3 target shows=()
    target=$(r "$dst")
    [[ -n ${4:-} ]] && shows=(--shows "install -D -m $mode $4 $target")
    if [[ -f $target ]] && cmp -s -- "$src" "$target"; then
        if [[ $(stat -c %a -- "$target") == "${mode#0}" ]]; then
            same "$dst"
        else
            act "set mode $mode on $dst" chmod "$mode" -- "$target"
        fi
    elif [[ -e $target ]]; then
        act "update $dst" "${shows[@]}" install -m "$mode" -- "$src" "$target"
    else
        act "install $dst" "${shows[@]}" install -D -m "$mode" -- "$src" "$target"
    fi
}

# write_file DESTINATION MODE CONTENT: the same as install_file, for generated content.
write_file() {
    local tmp
    tmp=$(mktemp)
    printf '%s' "$3" >"$tmp"
    install_file "$tmp" "$1" "$2" "<$(grep -v '^#' "$tmp" | tr '\n' ' ' | sed 's/ *$//')>"
    rm -f -- "$tmp"
}

# The fingerprint of what goes into the venv: every file of PACKAGE_FILES, by path and content.
source_fingerprint() {
    (
        cd -- "$SRC"
        find "${PACKAGE_FILES[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 |
            LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
    )
}

# --- checks: before anything is changed ---------------------------------------------------

if ((!DRY_RUN)) && [[ $(id -u) != 0 ]]; then
    die "must run as root (sudo $0 ${ARGS[*]}), or with --dry-run to see what it would do"
fi
((START && !ON_HOST)) && die "--start installs into / only; drop --root or --start"
for tool in useradd groupadd usermod systemctl install cmp sha256sum realpath; do
    command -v "$tool" >/dev/null || die "$tool is missing (passwd, systemd, coreutils, diffutils)"
done
[[ -f $SRC/pyproject.toml && -d $SRC/bms ]] || die "$SRC is not a pybms checkout"
if ((!ON_HOST)); then
    for f in passwd group shadow gshadow; do
        [[ -f $(r /etc/$f) ]] || ((DRY_RUN)) ||
            die "--root $ROOT has no etc/$f (useradd --root needs passwd, group, shadow, gshadow)"
    done
fi

command -v "$PYTHON" >/dev/null || die "no $PYTHON: install python3 (3.11 or newer) or pass --python"
PYTHON=$(command -v "$PYTHON")
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); pybms needs 3.11 or newer"
PYVER=$("$PYTHON" -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')
SITE_PACKAGES=$VENV/lib/$PYVER/site-packages
if [[ -n $REUSE ]]; then
    REUSE=$(realpath -- "$REUSE" 2>/dev/null) || die "--reuse-packages: no such directory"
    [[ -d $REUSE/pip ]] || die "--reuse-packages $REUSE: not a site-packages directory with pip in it"
elif [[ ! -x $(r "$VENV/bin/python") ]]; then
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
        die "$PYTHON cannot create a venv: install python3-venv (sudo apt-get install python3-venv)"
fi

if ((DRY_RUN)); then
    printf 'Installing pybms from %s into %s (dry run: nothing is changed)\n' "$SRC" "$ROOT"
else
    printf 'Installing pybms from %s into %s\n' "$SRC" "$ROOT"
fi

# --- user and groups -----------------------------------------------------------------------

for group in "$SERVICE_USER" "$ADMIN_GROUP"; do
    if [[ -n $(group_line "$group") ]]; then
        same "group $group"
    else
        act "create group $group" groupadd "${ROOT_OPT[@]}" --system "$group"
    fi
done

bus_groups=()
for group in "${BUS_GROUPS[@]}"; do
    if [[ -n $(group_line "$group") ]]; then
        bus_groups+=("$group")
    else
        note "no group $group here: the service cannot open the devices that group would own"
    fi
done

if user_exists "$SERVICE_USER"; then
    same "user $SERVICE_USER"
    for group in "${bus_groups[@]}"; do
        if is_member "$group" "$SERVICE_USER"; then
            same "user $SERVICE_USER in group $group"
        else
            act "add user $SERVICE_USER to group $group" \
                usermod "${ROOT_OPT[@]}" --append --groups "$group" "$SERVICE_USER"
        fi
    done
else
    groups_opt=()
    if ((${#bus_groups[@]})); then
        groups_opt=(--groups "$(
            IFS=,
            printf '%s' "${bus_groups[*]}"
        )")
    fi
    act "create user $SERVICE_USER${bus_groups[*]:+ (groups ${bus_groups[*]})}" \
        useradd "${ROOT_OPT[@]}" --system --gid "$SERVICE_USER" "${groups_opt[@]}" \
        --home-dir /var/lib/pybms --no-create-home --shell /usr/sbin/nologin \
        --comment "pybms battery-management service" "$SERVICE_USER"
fi

# --- the venv and pybms in it ---------------------------------------------------------------

create_venv() {
    local options=()
    [[ -n $REUSE ]] && options=(--without-pip) # pip comes from the reused packages
    "$PYTHON" -m venv "${options[@]}" "$(r "$VENV")" || {
        rm -rf -- "$(r "$VENV")"
        die "$PYTHON -m venv failed (python3-venv missing?)"
    }
}

install_pybms() {
    local build
    build=$(mktemp -d)
    # Built from a copy: pip's in-tree build would leave build/ and *.egg-info in the checkout.
    tar -C "$SRC" --exclude=__pycache__ --exclude='*.pyc' -cf - "${PACKAGE_FILES[@]}" |
        tar -C "$build" -xf -
    "$(r "$VENV/bin/python")" -m pip install --quiet --disable-pip-version-check \
        --upgrade "$build" || {
        rm -rf -- "$build"
        die "pip could not install pybms into $VENV (see above); run this again once fixed"
    }
    rm -rf -- "$build"
    printf '%s\n' "$FINGERPRINT" >"$(r "$VENV/.pybms-source")"
}

if [[ -x $(r "$VENV/bin/python") ]]; then
    same "venv $VENV"
else
    act "create the venv $VENV" \
        --shows "$PYTHON -m venv${REUSE:+ --without-pip} $(r "$VENV")" create_venv
fi
if [[ -n $REUSE ]]; then
    write_file "$SITE_PACKAGES/_pybms_reuse.pth" 0644 "$REUSE"$'\n'
fi
FINGERPRINT=$(source_fingerprint)
stamp=$(r "$VENV/.pybms-source")
if [[ -f $stamp && $(<"$stamp") == "$FINGERPRINT" && -x $(r "$VENV/bin/bms") ]]; then
    same "pybms in the venv (source ${FINGERPRINT:0:12})"
else
    act "install pybms (source ${FINGERPRINT:0:12}) into the venv" \
        --shows "$(r "$VENV/bin/python") -m pip install --upgrade <a copy of ${PACKAGE_FILES[*]}>" \
        install_pybms
fi

# --- shared data: what config/pack.example.toml points at --------------------------------

for f in "$SRC"/config/can/*.dbc; do
    install_file "$f" "$SHARE/can/${f##*/}" 0644
done
for f in "$SRC"/config/limits/*.toml; do
    install_file "$f" "$SHARE/limits/${f##*/}" 0644
done
for params in "$SRC"/models/ecm/*/params.toml; do
    set_dir=${params%/params.toml}
    for f in "$set_dir"/*; do
        if [[ -f $f ]]; then
            install_file "$f" "$SHARE/cells/${set_dir##*/}/${f##*/}" 0644
        fi
    done
done
install_file "$SRC/config/pack.example.toml" "$SHARE/pack.example.toml" 0644
install_file "$SRC/systemd/README.md" "$SHARE/README.md" 0644

# --- the config: the administrator's from the first run on ---------------------------------

install_config() {
    local gid
    gid=$(group_line "$SERVICE_USER" | cut -d: -f3)
    install -D -m 0640 -o 0 -g "$gid" -- "$SRC/config/pack.example.toml" "$(r "$CONFIG")"
}

if [[ -e $(r "$CONFIG") ]]; then
    same "$CONFIG (kept as it is; the new example is $SHARE/pack.example.toml)"
else
    act "install $CONFIG from config/pack.example.toml (root:$SERVICE_USER 0640)" \
        --shows "install -D -m 0640 -o 0 -g $SERVICE_USER $SRC/config/pack.example.toml $(r "$CONFIG")" \
        install_config
fi

# --- kernel: the CAN receive buffer --------------------------------------------------------

sysctl_before=$CHANGES
write_file "$SYSCTL" 0644 "# pybms: SocketCAN receive buffers up to [can] receive_buffer_bytes (4 MiB), which
# SO_RCVBUF is capped to without CAP_NET_ADMIN. Written by pybms's systemd/install.sh.
net.core.rmem_max = $RMEM_MAX_BYTES
"
if ((ON_HOST && !DRY_RUN && CHANGES > sysctl_before)); then
    if ! { command -v sysctl >/dev/null && sysctl -q -p "$SYSCTL"; }; then
        note "could not apply $SYSCTL now (a container?); it applies at boot"
    fi
fi

# --- the unit ------------------------------------------------------------------------------

unit_before=$CHANGES
install_file "$SRC/systemd/bms.service" "$UNIT" 0644
SYSTEMD_RUNNING=0
((ON_HOST)) && [[ -d /run/systemd/system ]] && SYSTEMD_RUNNING=1
if ((SYSTEMD_RUNNING && CHANGES > unit_before)); then
    act "reload systemd's units" systemctl daemon-reload
fi
if [[ $("${SYSTEMCTL[@]}" is-enabled "$UNIT_NAME" 2>/dev/null) == enabled ]]; then
    same "$UNIT_NAME enabled"
else
    act "enable $UNIT_NAME (it starts at boot)" "${SYSTEMCTL[@]}" --quiet enable "$UNIT_NAME"
fi

if ((SYSTEMD_RUNNING)) && systemctl --quiet is-active "$UNIT_NAME"; then
    same "$UNIT_NAME running"
    if ((CHANGES)); then
        note "$UNIT_NAME runs the old installation; restart it when the contactors may open:" \
            "systemctl restart $UNIT_NAME"
    fi
elif ((START)); then
    ((SYSTEMD_RUNNING)) || die "systemd is not running here: cannot --start"
    act "start $UNIT_NAME" systemctl start "$UNIT_NAME"
fi

# --- summary -------------------------------------------------------------------------------

if ((CHANGES == 0)); then
    printf 'Nothing to do: the installation in %s is up to date.\n' "$ROOT"
elif ((DRY_RUN)); then
    printf '%d actions would be taken; nothing was changed (--dry-run).\n' "$CHANGES"
else
    printf '%d changes made.\n' "$CHANGES"
    if ((!START)) && ((ON_HOST)); then
        printf 'Check %s (bms check-config %s), then: systemctl start %s\n' \
            "$CONFIG" "$CONFIG" "$UNIT_NAME"
    fi
fi
