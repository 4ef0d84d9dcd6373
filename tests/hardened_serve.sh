#!/usr/bin/env bash
# `vitserve serve` as the hardened pod runs it (k8s/base/deployment.yaml): UID/GID 1034 (the `bentoml` user of
# BentoML's image), no capabilities, no new privileges, the root filesystem and the project read-only, and only the
# pod's two emptyDirs writable: a fresh tmpfs on /tmp (medium: Memory) and the folder given as $1 for BENTOML_HOME
# (HOME is $1/home, as in the pod). The remaining arguments go to `vitserve serve`.
#
# It runs in a private mount namespace (unshare -m), so the read-only remounts apply there only and the host is
# untouched. Setting that up needs root (the server then runs as 1034); tests/test_k8s.py skips with a reason
# without it.
set -euo pipefail
bentoml_home=$(realpath "$1"); shift
case "$bentoml_home/" in /tmp/*) echo "BENTOML_HOME must not be under /tmp: a fresh /tmp hides it" >&2; exit 2;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
python=$root/.venv/bin/python                 # the venv: its pyvenv.cfg is found from this path
exec unshare --mount --propagation private bash -euo pipefail -c '
  home=$1 root=$2 python=$3; shift 3
  mkdir -p "$home/home" && chown -R 1034:1034 "$home" && chmod 0700 "$home"
  mount --bind "$home" "$home"                        # the bentoml-home emptyDir: its own, writable mount
  # A checkout under /tmp (a CI clone) would vanish under the fresh /tmp: hold it aside and put it back on top.
  case "$root/" in /tmp/*) mkdir "$home/.project" && mount --bind "$root" "$home/.project";; esac
  mount -t tmpfs -o mode=1777,size=256m tmpfs /tmp    # the /tmp emptyDir
  case "$root/" in /tmp/*) mkdir -p "$root" && mount --move "$home/.project" "$root" && rmdir "$home/.project";; esac
  # A pyenv interpreter under /root (mode 0700 here) would be out of reach of UID 1034: show it, read-only, just
  # that prefix. An image puts Python under /usr, where this is not needed.
  real=$(realpath "$python")
  case "$real" in /root/*)
    rel=${real#/root/}; top=${rel%%/*}
    mkdir /tmp/.root && mount --bind /root /tmp/.root
    mount -t tmpfs -o mode=0755,size=1m tmpfs /root
    mkdir "/root/$top" && mount --bind "/tmp/.root/$top" "/root/$top" && umount /tmp/.root && rmdir /tmp/.root
    mount -o remount,bind,ro "/root/$top" && mount -o remount,ro /root;;
  esac
  mount --bind "$root" "$root" && mount -o remount,bind,ro "$root"   # the project, even on its own filesystem
  mount -o remount,bind,ro /                                          # readOnlyRootFilesystem
  cd "$root"
  exec setpriv --reuid=1034 --regid=1034 --clear-groups --no-new-privs --inh-caps=-all --bounding-set=-all \
    env HOME="$home/home" BENTOML_HOME="$home" TMPDIR=/tmp PYTHONDONTWRITEBYTECODE=1 \
    "$python" vitserve.py serve "$@"
' bash "$bentoml_home" "$root" "$python" "$@"
