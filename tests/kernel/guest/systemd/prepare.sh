#!/bin/sh
# Prepares the qemu guest's root for systemd (the tests' one boot, tests/kernel/systemd_guest.py):
# run by the guest's /init (init.sh) in that root, as root, before it hands PID 1 to
# /lib/systemd/systemd.
# The root is the host's / under a RAM overlay, so everything written here is gone at power-off.
#
# Installs what systemd/install.sh would, without its venv (pip under emulation would take
# minutes): the user and groups, the config in /etc/pybms, this checkout's .venv as
# /opt/pybms/venv, the sysctl, systemd/bms.service unchanged with the drop-in bms-guest.conf,
# and the test's own units. Usage: prepare.sh WORK (the share's directory with the generated
# pack.toml and guest.env, see tests/kernel/systemd_guest.py).
set -eu
WORK=$1
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../../.." && pwd)
UNITS=/etc/systemd/system

# The host is a Docker container: with /.dockerenv present, systemd (since 248) takes itself
# for a container's init and then reads its own arguments instead of the kernel command line
# (so systemd.unit= is ignored and the default target boots) and skips what a container lacks.
rm -f /.dockerenv /run/.containerenv

for group in pybms pybms-admin; do
  getent group "$group" >/dev/null || groupadd --system "$group"
done
getent passwd pybms >/dev/null ||
  useradd --system --gid pybms --home-dir /var/lib/pybms --no-create-home \
    --shell /usr/sbin/nologin --comment "pybms battery-management service" pybms

# The unit's ExecStart= and ExecStopPost= name /opt/pybms/venv/bin/bms: this checkout's venv.
mkdir -p /opt/pybms
rm -rf /opt/pybms/venv
ln -s "$REPO/.venv" /opt/pybms/venv
install -D -m 0640 -o 0 -g pybms "$WORK/pack.toml" /etc/pybms/pack.toml
install -D -m 0644 "$WORK/guest.env" /etc/pybms-test/guest.env
printf 'net.core.rmem_max = 4194304\n' >/etc/sysctl.d/60-pybms.conf

# The kernels the host compiled into the share (harness.warm_numba_cache), where the unit's
# NUMBA_CACHE_DIR is; Numba finds them by the sources' paths, which are the same here.
mkdir -p /var/cache/pybms
rm -rf /var/cache/pybms/numba
cp -R "$PYBMS_SHARE/numba" /var/cache/pybms/numba
chown -R pybms:pybms /var/cache/pybms

install -m 0644 "$REPO/systemd/bms.service" "$UNITS/bms.service"
install -D -m 0644 "$HERE/bms-guest.conf" "$UNITS/bms.service.d/guest.conf"
# The venv's interpreter lives where its pyvenv.cfg says. Under /root or /home (pyenv on the CI
# host: /root/.pyenv/...) the unit's ProtectHome=yes hides it and the start fails with
# 203/EXEC, "Permission denied"; on a board it is /usr/bin. So here, and only then, those
# directories become empty, read-only tmpfs with the interpreter's tree bound in, read-only.
python_prefix=$(sed -n 's|^home = \(.*\)/bin$|\1|p' "$REPO/.venv/pyvenv.cfg")
case "$python_prefix" in
  /root/* | /home/*)
    printf '%s\n' \
      "# written by tests/kernel/guest/systemd/prepare.sh: the venv's Python is in $python_prefix" \
      "[Service]" "ProtectHome=tmpfs" "BindReadOnlyPaths=$python_prefix" \
      >"$UNITS/bms.service.d/python-home.conf"
    ;;
esac
# The same for the checkout itself (and so /opt/pybms/venv): under /tmp (a CI clone there), the
# unit's PrivateTmp=yes gives the service an empty /tmp and the start fails with 203/EXEC.
case "$REPO" in
  /tmp/*)
    printf '%s\n' \
      "# written by tests/kernel/guest/systemd/prepare.sh: the checkout is in $REPO" \
      "[Service]" "PrivateTmp=no" \
      >"$UNITS/bms.service.d/checkout-in-tmp.conf"
    ;;
esac
for unit in bms-plant.service pybms-bus-tests.service pybms-systemd-checks.service \
  pybms-systemd-checks.target; do
  install -m 0644 "$HERE/$unit" "$UNITS/$unit"
done
# The host's own services that sysinit.target pulls in and this boot does not need.
for unit in systemd-timesyncd.service systemd-pstore.service; do
  ln -sfn /dev/null "$UNITS/$unit"
done
# Debian's tmpfiles.d/tmp.conf empties /tmp at boot ("D /tmp"). The checkout, its .venv and the
# share may live under /tmp (a CI clone there made the checks service exit 127: its script was
# gone), so this boot keeps /tmp as it finds it: same name in /etc overrides the vendor file.
printf 'd /tmp 1777 root root -\n' >/etc/tmpfiles.d/tmp.conf
