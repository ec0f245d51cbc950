#!/bin/bash
# GitHub Actions runner hook, ACTIONS_RUNNER_HOOK_JOB_STARTED: puts the job under ringfence
# before its first step.
#
# The runner runs it as `bash -e job-started.sh`, as the runner's user, as a child of
# Runner.Worker, in $GITHUB_WORKSPACE, with the job's GITHUB_* variables; before any step,
# so before actions/checkout. Runner.Worker moves into the job's cgroup (everything it
# starts from then on is the job, the job-completed hook included); this hook stays out.
#
# Policy: $GITHUB_WORKSPACE/.github/ringfence.toml if the workspace holds one at this point
# (and the host allows it: REPO_POLICY), else the host's default policy. Settings:
# runner-hooks.conf (see deploy/README.md).
#
# Fails closed: when the job cannot be put under ringfence and its policy is block mode (or
# its mode cannot be told), the hook exits 1 and the runner fails the job before any step
# runs. An audit-mode job goes on unguarded with a warning. A policy that does not parse
# fails the job in both modes: it is the repository's to fix, and guessing is worse.
# The runner starts hooks with `bash -e`; the errors here are handled, each with its message.
set +e -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=ringfence-hooks.sh
. "$HERE/ringfence-hooks.sh"

error() {
  echo "::error title=ringfence::$*"
  echo "ringfence: $*" >&2
}

CONF=$(rf_config_file "$HERE")
if [ -n "$CONF" ] && ! { rf_root_owned "$CONF" && rf_load_config "$CONF"; }; then
  error "the runner's ringfence settings ($CONF) are unusable: not running this job unguarded"
  exit 1
fi

ID=$(rf_job_id)
WS_POLICY=${GITHUB_WORKSPACE:-}/.github/ringfence.toml
if [ "$CFG_REPO_POLICY" = workspace ] && [ -n "${GITHUB_WORKSPACE:-}" ] && [ -f "$WS_POLICY" ]; then
  FROM=workspace POLICY=$WS_POLICY
else
  FROM=default POLICY=$CFG_DEFAULT_POLICY
fi
MODE=${CFG_MODE:-$(rf_policy_mode "$POLICY")}

if [ "$(id -u)" = 0 ]; then
  HELPER=("$HERE/ringfence-runner-job")
else
  HELPER=(sudo -n "$HERE/ringfence-runner-job")
fi

echo "ringfence: job $ID, policy $POLICY ($MODE mode)"
if [ "$FROM" = workspace ]; then
  if [ ! -r "$POLICY" ]; then
    # Unreadable to the runner's user is the repository's problem, like a parse error.
    error "cannot read $POLICY"
    exit 1
  fi
  "${HELPER[@]}" start "$ID" workspace <"$POLICY"
else
  "${HELPER[@]}" start "$ID" </dev/null
fi
rc=$?
if [ $rc = 0 ]; then
  exit 0
fi
if [ $rc = 2 ]; then
  error "the policy $POLICY was refused (above): fix it; the job does not run unguarded"
  exit 1
fi
case $MODE in
  audit)
    echo "::warning title=ringfence::could not put this job under ringfence (see above); audit mode: it runs unwatched"
    exit 0 ;;
  *)
    error "could not put this job under ringfence (see above) and its policy is $MODE mode: not running it unguarded. Is ringfence.service running, and the sudoers line for $(id -un) installed (deploy/README.md)?"
    exit 1 ;;
esac
