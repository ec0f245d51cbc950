#!/bin/bash
# STAND-IN for the runner's runsvc.sh (actions.runner.test.service): says it started, then
# waits. Its first line in the journal is when "the runner" started; packer/test compares
# it with when ringfence became ready.
echo "stand-in runner started as $(id -un) (pid $$): no real runner in this image"
exec sleep infinity
