#!/usr/bin/env bash
# Install what berth needs on a fresh Debian 12 machine (run as root), idempotently:
# Debian packages, then berth itself (editable, with its test tools), then byte-compile the
# sources so the CLI starts fast even where PYTHONDONTWRITEBYTECODE is set.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages berth's code and tests use: the peers the tests drive for real (runc, a registry,
# skopeo, containerd and podman as drivers of berth-runtime), busybox for test images, htpasswd for the
# registry's basic auth, libseccomp for seccomp filters, nftables for published ports, a C compiler for
# the CLI's compiled launcher, lsattr (e2fsprogs) for the tests of the ext4 directory hint.
APT_PACKAGES=(iproute2 procps e2fsprogs btrfs-progs libbtrfsutil-dev runc busybox-static docker-registry skopeo
              containerd podman umoci libseccomp2 nftables apache2-utils uidmap gcc libc6-dev)

missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install -q --disable-pip-version-check -e '.[test,btrfs]'
"$PYTHON" -m compileall -q core plugins runtimes snapshotters client conformance >/dev/null

# The `berth` launcher hands commands to a warm command server; compiled, it skips even the few
# milliseconds of a bare Python start-up. berth-launch is what bin/berth (pip's copy) runs when it sits
# beside it; the compiled `berth`, with this Python built in, then takes the place of pip's copy and
# saves the shell's exec too (a later `pip install` puts the script back, which still finds berth-launch).
bindir=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
interpreter=$("$PYTHON" -c 'import sys; print(sys.executable)')
cc -O2 -Wall -o "$bindir/berth-launch.new" bin/berth-launch.c
mv "$bindir/berth-launch.new" "$bindir/berth-launch"
cc -O2 -Wall -DBERTH_PYTHON="\"$interpreter\"" -o "$bindir/berth.new" bin/berth-launch.c
mv "$bindir/berth.new" "$bindir/berth"
