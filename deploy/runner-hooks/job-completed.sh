#!/bin/bash
# GitHub Actions runner hook, ACTIONS_RUNNER_HOOK_JOB_COMPLETED: the job's ringfence report,
# into the job's summary ($GITHUB_STEP_SUMMARY) and its log.
#
# The runner runs it after the job's last step (also a failed or cancelled one), as the
# runner's user, as a child of Runner.Worker: inside the job, like the steps. It does not
# end the job. Anything that can end a job from here, a step could do as well (same user,
# same cgroup), and the steps after it would run unguarded; so the job ends when
# Runner.Worker exits (ringfence-runner-job's watcher), which also kills what the job left
# running and keeps the final report on the host (<data-dir>/jobs/<id>/report.md).
#
# The report here is the job's so far, i.e. every step. Problems only warn: the job's steps
# are over and the kernel enforced its policy whatever happens to the report.
# The runner starts hooks with `bash -e`; the errors here are handled, each with its message.
set +e -uo pipefail
export LC_ALL=C
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=ringfence-hooks.sh
. "$HERE/ringfence-hooks.sh"

warn() {
  echo "::warning title=ringfence::$*"
  echo "ringfence: $*" >&2
}

CONF=$(rf_config_file "$HERE")
if [ -n "$CONF" ] && ! { rf_root_owned "$CONF" && rf_load_config "$CONF"; }; then
  warn "the runner's ringfence settings ($CONF) are unusable: no report"
  exit 0
fi
ID=$(rf_job_id)

if [ "$(id -u)" = 0 ]; then
  HELPER=("$HERE/ringfence-runner-job")
else
  HELPER=(sudo -n "$HERE/ringfence-runner-job")
fi

ERR=$(mktemp)
trap 'rm -f "$ERR"' EXIT
if ! REPORT=$("${HELPER[@]}" report 2>"$ERR"); then
  warn "no ringfence report for job $ID: $(cat "$ERR")"
  exit 0
fi

# Into the log, with workflow commands off: the report quotes names the job chose.
TOKEN=ringfence-$RANDOM$RANDOM$RANDOM
echo "::group::ringfence report (job $ID)"
echo "::stop-commands::$TOKEN"
printf '%s\n' "$REPORT"
echo "::$TOKEN::"
echo "::endgroup::"

if [ -z "${GITHUB_STEP_SUMMARY:-}" ]; then
  echo "ringfence: GITHUB_STEP_SUMMARY is not set: the report is in the log above only" >&2
  exit 0
fi
# The runner uploads a summary of at most 128 KiB (and none at all above that).
LIMIT=$((120 * 1024))
if [ ${#REPORT} -gt $LIMIT ]; then
  REPORT="${REPORT:0:$LIMIT}"
  REPORT="${REPORT%$'\n'*}

> **ringfence:** the report is cut here to fit the job summary (128 KiB). The whole report
> is in this job's log (the job-completed hook's step) and on the runner host."
fi
if ! printf '%s\n' "$REPORT" 2>"$ERR" >>"$GITHUB_STEP_SUMMARY"; then
  echo "ringfence: cannot write the job summary $GITHUB_STEP_SUMMARY ($(cat "$ERR")): the report is in the log above only" >&2
fi
exit 0
