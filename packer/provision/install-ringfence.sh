#!/bin/bash
# Provisioning step 1 (packer/ringfence.pkr.hcl runs it as root inside the image; it can
# also be run by hand on a runner host): the ringfence binary, the daemon's unit and
# config, the image's host policy and the jobs' default policy. The daemon is enabled, not
# started: it first runs at the image's next boot, before the runner.
# Input: $PAYLOAD (default /tmp/ringfence-image) holds what the file provisioners
# uploaded: ringfence (the binary), deploy/ and packer/ of the repository.
set -euo pipefail
PAYLOAD=${PAYLOAD:-/tmp/ringfence-image}
say() { echo "provision/install-ringfence: $*"; }
die() { echo "provision/install-ringfence: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
for f in ringfence deploy/systemd/ringfence.service deploy/ringfence.toml deploy/default-policy.toml \
         packer/host-policy.toml packer/host-addresses.txt; do
  [ -e "$PAYLOAD/$f" ] || die "$PAYLOAD/$f is missing: the file provisioners upload it first"
done
# What the unit and the daemon call at run time. A Debian cloud image has them all.
for c in findmnt systemctl; do
  command -v "$c" >/dev/null || die "$c is not installed in the image"
done

say "binary: /usr/local/bin/ringfence ($("$PAYLOAD/ringfence" --version))"
install -m 0755 "$PAYLOAD/ringfence" /usr/local/bin/ringfence

install -d -m 0755 /etc/ringfence
# The daemon's config is deploy's, with the host policy switched on. Checked after the
# edit: if deploy/ringfence.toml no longer has the commented line, fail rather than ship an
# image whose host traffic nothing judges.
sed 's|^# host-policy = .*|host-policy = "/etc/ringfence/host-policy.toml"|' \
  "$PAYLOAD/deploy/ringfence.toml" >/etc/ringfence/ringfence.toml
grep -qx 'host-policy = "/etc/ringfence/host-policy.toml"' /etc/ringfence/ringfence.toml ||
  die "could not set host-policy in /etc/ringfence/ringfence.toml (deploy/ringfence.toml has no '# host-policy = ' line)"
chmod 0644 /etc/ringfence/ringfence.toml
install -m 0644 "$PAYLOAD/packer/host-policy.toml" /etc/ringfence/host-policy.toml
install -m 0644 "$PAYLOAD/packer/host-addresses.txt" /etc/ringfence/host-addresses.txt
install -m 0644 "$PAYLOAD/deploy/default-policy.toml" /etc/ringfence/default-policy.toml
say "config: /etc/ringfence/ringfence.toml (host-policy on), host-policy.toml, host-addresses.txt, default-policy.toml"

# Refuse a policy the daemon would refuse at boot (exit 2 names file, line and token), and
# make sure the image blocks what it promises.
/usr/local/bin/ringfence policy check --policy /etc/ringfence/host-policy.toml github.com:443 >/dev/null
for e in 169.254.169.254:80 198.51.100.1:443; do
  if /usr/local/bin/ringfence policy check --policy /etc/ringfence/host-policy.toml "$e" >/dev/null; then
    die "the host policy allows $e: metadata and direct IPs must stay blocked"
  fi
done

install -m 0644 "$PAYLOAD/deploy/systemd/ringfence.service" /etc/systemd/system/ringfence.service
install -D -m 0644 "$PAYLOAD/packer/provision/files/ringfence-log.conf" /etc/systemd/system/ringfence.service.d/log.conf
# cloud-init (Debian's AMIs) reads the instance's ssh keys and user data from the metadata
# service, which the host policy blocks: ringfence starts once cloud-init's network stage
# has them. The runner stays ordered after ringfence.
if [ -d /etc/cloud ] || command -v cloud-init >/dev/null; then
  install -D -m 0644 "$PAYLOAD/packer/provision/files/ringfence-after-cloud-init.conf" \
    /etc/systemd/system/ringfence.service.d/after-cloud-init.conf
  say "cloud-init found: ringfence.service starts after cloud-init.service (metadata fetched)"
fi
systemctl daemon-reload
systemctl enable ringfence.service
say "unit: ringfence.service enabled (starts at boot, Type=notify; not started now), logging at info"
