#!/bin/bash
# Provisioning step 2: the runner's user, the job hooks and their sudoers line, and the
# ordering of every runner unit after ringfence.service.
# Input: $PAYLOAD (see install-ringfence.sh); $RUNNER_USER (default runner), the user the
# runner will run as (created if missing).
set -euo pipefail
PAYLOAD=${PAYLOAD:-/tmp/ringfence-image}
RUNNER_USER=${RUNNER_USER:-runner}
HOOKS=/usr/local/lib/ringfence/runner-hooks
say() { echo "provision/install-runner-hooks: $*"; }
die() { echo "provision/install-runner-hooks: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
[[ $RUNNER_USER =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] || die "RUNNER_USER=${RUNNER_USER@Q}: not a user name"
for c in sudo visudo setsid bash; do
  command -v "$c" >/dev/null || die "$c is not installed in the image (the hooks need it)"
done

if ! id "$RUNNER_USER" >/dev/null 2>&1; then
  useradd --create-home --shell /bin/bash "$RUNNER_USER"
  say "user $RUNNER_USER created"
fi

install -d -m 0755 "$HOOKS"
install -m 0755 "$PAYLOAD"/deploy/runner-hooks/{job-started.sh,job-completed.sh,ringfence-runner-job} "$HOOKS/"
install -m 0644 "$PAYLOAD/deploy/runner-hooks/ringfence-hooks.sh" "$HOOKS/"

# RUNNER_ALLOW (what Runner.Worker may reach from inside each job) is taken from the host
# policy's allowed-endpoints, so the runner's endpoints are listed in one place only
# (packer/host-policy.toml).
allow=$(awk '/^allowed-endpoints[[:space:]]*=[[:space:]]*"""/ { on = 1; next }
             on && /^"""/ { exit }
             on { sub(/#.*/, ""); for (i = 1; i <= NF; i++) printf "%s%s", sep, $i; sep = " " }' \
        /etc/ringfence/host-policy.toml)
[ -n "$allow" ] || die "no allowed-endpoints in /etc/ringfence/host-policy.toml (run install-ringfence.sh first)"
{
  cat "$PAYLOAD/deploy/runner-hooks.conf"
  echo
  echo "# Set by packer/provision/install-runner-hooks.sh from /etc/ringfence/host-policy.toml"
  echo "# (allowed-endpoints): the runner's endpoints are listed there, and only there."
  echo "RUNNER_ALLOW=$allow"
} >/etc/ringfence/runner-hooks.conf
chmod 0644 /etc/ringfence/runner-hooks.conf
say "hooks: $HOOKS; RUNNER_ALLOW=$allow"

# The documented sudoers line, for this user.
tmp=$(mktemp)
sed "s/^runner /$RUNNER_USER /" "$PAYLOAD/deploy/runner-hooks/sudoers" >"$tmp"
visudo -cqf "$tmp" || die "visudo rejects the sudoers line for $RUNNER_USER"
install -m 0440 "$tmp" /etc/sudoers.d/ringfence-runner
rm -f "$tmp"
say "sudoers: /etc/sudoers.d/ringfence-runner ($RUNNER_USER may run the helper, nothing else)"

# The runner's unit does not exist yet: the runner is registered when a VM of this image
# first boots (config.sh, then svc.sh install writes actions.runner.<owner>-<repo>.<name>
# .service and reloads systemd). A generator gives every such unit deploy's drop-in
# (After= and Wants= ringfence.service) at each boot and each daemon-reload, whatever its
# name: the ordering is in place before the runner's first start.
install -d -m 0755 /usr/local/lib/ringfence/systemd/actions.runner.service.d
install -m 0644 "$PAYLOAD/deploy/systemd/actions.runner.service.d/ringfence.conf" \
  /usr/local/lib/ringfence/systemd/actions.runner.service.d/ringfence.conf
install -d -m 0755 /etc/systemd/system-generators
install -m 0755 "$PAYLOAD/packer/provision/files/ringfence-runner-order" /etc/systemd/system-generators/
systemctl daemon-reload
say "generator: /etc/systemd/system-generators/ringfence-runner-order (orders actions.runner.*.service after ringfence.service)"
