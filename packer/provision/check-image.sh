#!/bin/bash
# Provisioning step 4: what can be checked before the first boot. systemd's own verifier
# on the units (with the runner's drop-in, through a unit named like svc.sh names them),
# the sudoers file, the files' owners and modes the hooks insist on. What can only be
# seen at boot (programs attached and pinned before the runner) is packer/test's.
set -euo pipefail
say() { echo "provision/check-image: $*"; }
die() { echo "provision/check-image: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
HOOKS=/usr/local/lib/ringfence/runner-hooks
for f in /usr/local/bin/ringfence /etc/ringfence/ringfence.toml /etc/ringfence/host-policy.toml \
         /etc/ringfence/default-policy.toml /etc/ringfence/runner-hooks.conf "$HOOKS/ringfence-runner-job" \
         "$HOOKS/ringfence-hooks.sh" "$HOOKS/job-started.sh" "$HOOKS/job-completed.sh"; do
  owner=$(stat -c %u "$f") mode=$(stat -c %a "$f")
  if [ "$owner" != 0 ] || (( (8#$mode & 8#022) != 0 )); then
    die "$f must be root's and writable by root only (uid $owner, mode $mode): the hooks refuse it"
  fi
done
visudo -cqf /etc/sudoers.d/ringfence-runner || die "visudo rejects /etc/sudoers.d/ringfence-runner"
systemctl is-enabled -q ringfence.service || die "ringfence.service is not enabled"

# A runner unit as svc.sh writes it, with the generator's drop-in: verified together.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unit=actions.runner.octo-org-repo.runner-1.service
printf '[Unit]\nDescription=runner\nAfter=network.target\n\n[Service]\nExecStart=/bin/true\nKillMode=process\n\n[Install]\nWantedBy=multi-user.target\n' >"$tmp/$unit"
mkdir "$tmp/$unit.d"
cp /usr/local/lib/ringfence/systemd/actions.runner.service.d/ringfence.conf "$tmp/$unit.d/"
# (ringfence.service is verified with its drop-ins, log.conf included.)
if ! out=$(systemd-analyze verify /etc/systemd/system/ringfence.service "$tmp/$unit" 2>&1) || [ -n "$out" ]; then
  die "systemd-analyze verify: ${out:-failed}"
fi
gen=$(mktemp -d)
cp "$tmp/$unit" /etc/systemd/system/
/etc/systemd/system-generators/ringfence-runner-order "$gen" "$gen" "$gen"
rm -f "/etc/systemd/system/$unit"
cmp -s "$gen/$unit.d/ringfence.conf" /usr/local/lib/ringfence/systemd/actions.runner.service.d/ringfence.conf ||
  die "the generator wrote no drop-in for $unit"
rm -rf "$gen"
say "units verify, the generator orders runner units, sudoers and file modes are right"
