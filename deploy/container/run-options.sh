#!/usr/bin/env bash
# Prints the podman options that let a container start on this host, for `podman build` and `podman run`:
# - limits on open files and processes no higher than the host's: podman's defaults are higher, and raising
#   a limit needs CAP_SYS_RESOURCE, which sandboxed hosts drop ("crun: setrlimit `RLIMIT_NOFILE`: Operation
#   not permitted"). Processes are capped at 32768 too: on the machine this was written on, runc refused
#   65536 although `ulimit -Hu` said 96363 (32768 is plenty for vLLM's threads);
# - runc where cgroup v1 and v2 are mounted side by side ("hybrid"): crun refuses those ("crun: cgroups in
#   hybrid mode not supported, drop all controllers from cgroupv2"), runc handles them.
set -euo pipefail
files=$(ulimit -Hn)
processes=$(ulimit -Hu)
options="--ulimit nofile=$files:$files"
if [ "$processes" = unlimited ] || [ "$processes" -gt 32768 ]; then processes=32768; fi
options+=" --ulimit nproc=$processes:$processes"
if [ -d /sys/fs/cgroup/unified ] && command -v runc >/dev/null; then
  options+=" --runtime runc"
fi
echo "$options"
