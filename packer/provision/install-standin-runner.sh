#!/bin/bash
# Provisioning step 3, local test image only (STANDIN_RUNNER=1): a STAND-IN for the GitHub
# Actions runner, actions.runner.test.service. No real runner can be downloaded or
# registered here; the stand-in's unit is the runner's own unit template (actions/runner,
# bin/actions.runner.service.template) with ExecStart= replaced, installed where svc.sh
# installs it, so the generator gives it exactly the ordering a real runner unit gets.
# packer/test reads the boot's journal to check it started after ringfence was serving.
set -euo pipefail
PAYLOAD=${PAYLOAD:-/tmp/ringfence-image}
RUNNER_USER=${RUNNER_USER:-runner}
say() { echo "provision/install-standin-runner: $*"; }
die() { echo "provision/install-standin-runner: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
if [ "${STANDIN_RUNNER:-0}" != 1 ]; then
  say "skipped (STANDIN_RUNNER is not 1: a real fleet registers its own runner)"
  exit 0
fi
id "$RUNNER_USER" >/dev/null 2>&1 || die "no user $RUNNER_USER (install-runner-hooks.sh creates it)"
install -d -m 0755 /usr/local/lib/ringfence/standin-runner
install -m 0755 "$PAYLOAD/packer/provision/files/standin-runsvc.sh" /usr/local/lib/ringfence/standin-runner/runsvc.sh
sed "s/@RUNNER_USER@/$RUNNER_USER/" "$PAYLOAD/packer/provision/files/actions.runner.test.service" \
  >/etc/systemd/system/actions.runner.test.service
chmod 0644 /etc/systemd/system/actions.runner.test.service
systemctl daemon-reload
systemctl enable actions.runner.test.service
# The generator ran at the daemon-reload above: the ordering must be there now.
after=$(systemctl show -p After --value actions.runner.test.service)
case " $after " in
  *" ringfence.service "*) say "actions.runner.test.service enabled; After=: ringfence.service (from the generator's drop-in)" ;;
  *) die "actions.runner.test.service is not ordered after ringfence.service (After=$after): the generator did not apply" ;;
esac
