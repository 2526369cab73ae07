#!/usr/bin/env bash
# Install the Debian packages coil's tests and demo use, if they are missing:
# iproute2 (ip netns), bird2 (BIRD 2), containernetworking-plugins (ptp, bridge, host-local);
# for the image and the plugin bundle (make image, make cni-bundle, tests/test_image.py,
# tests/test_cni_bundle.py): podman with runc, mmdebstrap, and busybox-static (a node root
# filesystem without libc or Python).
set -euo pipefail
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v bird >/dev/null 2>&1 || need+=(bird2)
[ -x /usr/lib/cni/ptp ] || need+=(containernetworking-plugins)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "deps: missing ${need[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# BIRD is started by the tests themselves, never as a system service.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet bird 2>/dev/null; then
  systemctl stop bird || true
fi
