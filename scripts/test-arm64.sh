#!/usr/bin/env bash
# The runtime on aarch64, proven under emulation: a Raspberry Pi 5 (Cortex-A76, NEON + dotprod)
# and a Raspberry Pi 4 (Cortex-A72, NEON only), each run by qemu-user in an arm64 Debian root.
#
#   sudo scripts/test-arm64.sh [--root DIR] [--cpu cortex-a76|cortex-a72 ...] [--quick] [--rebuild]
#
# 1. host tools: qemu-user-static, debootstrap, binfmt-support (apt-get, once); binfmt_misc
# 2. an arm64 Debian bookworm root (debootstrap minbase, once, cached in --root) with its own
#    resolv.conf, CA bundle and pip configuration (the host's pip.conf names x86-only wheel folders)
# 3. a venv in the root: numpy, numba, tokenizers as aarch64 wheels from PyPI, then the device
#    install of this checkout (`pip install .`, base dependencies only), redone when the package
#    sources change
# 4. on x86: tiny models built with torch, quantized and exported, run on the x86 runtime; the
#    exports and the expected tokens/logits go to a folder the arm root reads (scripts/arm64_parity.py)
# 5. per CPU, QEMU_CPU=<cpu> and NUMBA_CPU_NAME=<cpu> (qemu 7.2 shows LLVM the host's /proc/cpuinfo,
#    so numba would otherwise compile for "generic"): the kernel tests, then the tiny-model check
#    (tokens equal to x86, logits within the runtime's tolerance; on this machine a verify pass
#    equal to as many decode steps and two slots of the batched step equal to their runs alone,
#    bit for bit; a Gemma-3-like model whose sliding layers' ring buffers wrap). --quick runs only
#    the kernel tests that cover every tier at its extremes (the NEON hooks against numpy, each
#    tier's load-time self-check, the int16/int32 extreme codes) and the multi-row kernels on every
#    tier (tests/test_kernels_rows.py: verify and batched linears against the decode kernel, the
#    batched and ring attention against numpy) instead of all of test_kernels.py: under emulation a
#    cold numba cache makes the full file take hours on a loaded 2-core machine
#
# Cached between runs under --root: the root, the venv, the numba cache per CPU, the x86 reference.
# Needs root (debootstrap, mount, chroot). Exit code: 0 all passed, 1 a check failed, 2 bad usage.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=/work/models/arm64-root
CPUS=()
REBUILD=0
QUICK=0
HOST_PY=${HOST_PY:-$REPO/.venv/bin/python}
MIRROR=http://deb.debian.org/debian
KERNEL_TESTS=(tests/test_kernels*.py tests/test_neon*.py)
# the NEON tests that execute aarch64 code (the rest read cross-compiled assembly, host-independent:
# `make test` runs them on x86)
NEON_SELECT="matches_numpy or registered"
QUICK_SELECT="test_self_check or test_dot_extremes or test_kernels_rows or $NEON_SELECT"

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }
log() { printf '[test-arm64 %s +%4ds] %s\n' "$(date -u +%H:%M:%S)" "$((SECONDS - T0))" "$*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
    --cpu) [ $# -ge 2 ] || die "--cpu needs cortex-a76 or cortex-a72"; CPUS+=("$2"); shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    --quick) QUICK=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1'; see --help" ;;
  esac
done
[ ${#CPUS[@]} -gt 0 ] || CPUS=(cortex-a76 cortex-a72)
for c in "${CPUS[@]}"; do
  case "$c" in cortex-a76|cortex-a72) ;; *) die "--cpu '$c' is not supported; give cortex-a76 (Pi 5) or cortex-a72 (Pi 4)" ;; esac
done
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, mount, chroot); run it with sudo"
[ -x "$HOST_PY" ] || die "no x86 Python at $HOST_PY; run 'make setup' first (it builds the tiny models with torch)"
ROOT=$(realpath -m "$ROOT")
CACHE=$ROOT/var/cache/edgellm          # everything this script keeps inside the root
T0=$SECONDS

# ----------------------------------------------------------------------------- 1. host tools
if ! command -v debootstrap >/dev/null || ! [ -x /usr/bin/qemu-aarch64-static ] || ! command -v update-binfmts >/dev/null; then
  log "installing qemu-user-static, debootstrap, binfmt-support"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-user-static debootstrap binfmt-support
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || die "binfmt_misc has no qemu-aarch64 entry after update-binfmts --enable"

# ----------------------------------------------------------------------------- 2. the root
if [ "$REBUILD" = 1 ] && [ -e "$ROOT" ]; then
  log "--rebuild: removing $ROOT"
  rm -rf --one-file-system "$ROOT"
fi
if ! [ -f "$ROOT/.edgellm-root" ]; then
  log "debootstrap arm64 bookworm into $ROOT (minutes)"
  rm -rf --one-file-system "$ROOT.tmp"
  mkdir -p "$(dirname "$ROOT")"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,libgomp1 \
    bookworm "$ROOT.tmp" "$MIRROR"
  rm -rf --one-file-system "$ROOT"
  mv "$ROOT.tmp" "$ROOT"
  touch "$ROOT/.edgellm-root"
fi
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp -L /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
cat > "$ROOT/etc/pip.conf" <<'EOF'
# written by edgellm scripts/test-arm64.sh: PyPI only (the host's pip.conf names x86 wheel folders)
[global]
index-url = https://pypi.org/simple
cert = /etc/ssl/certs/ca-certificates.crt
timeout = 180
disable-pip-version-check = true
EOF
mkdir -p "$CACHE"

MOUNTS=()
cleanup() {
  local i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
mount_in() {  # mount_in TARGET ARGS...: mount inside the root once, unmounted at exit
  local target=$ROOT$1; shift
  mountpoint -q "$target" && return 0
  mkdir -p "$target"
  mount "$@" "$target"
  MOUNTS+=("$target")
}
mount_in /proc -t proc proc
mount_in /sys -t sysfs sysfs
mount_in /dev --bind /dev
mount --make-private "$ROOT/dev"   # nothing mounted below it may propagate to the host's /dev
mount_in /dev/shm -t tmpfs tmpfs   # numba's workqueue/omp and multiprocessing want a real /dev/shm

in_root() {  # in_root [VAR=value ...] CMD...: a clean environment (no host PIP_* variables)
  chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin PIP_CONFIG_FILE=/etc/pip.conf "$@"
}

# ----------------------------------------------------------------------------- 3. venv + device install
if ! [ -f "$ROOT/opt/venv/.edgellm-deps" ]; then
  log "venv in the root: numpy, numba, tokenizers (aarch64 wheels from PyPI)"
  rm -rf "$ROOT/opt/venv"
  in_root python3 -m venv /opt/venv
  in_root pip install -q --upgrade pip
  in_root pip install -q --only-binary=:all: numpy numba tokenizers
  in_root pip install -q --only-binary=:all: pytest 'setuptools>=68' wheel
  touch "$ROOT/opt/venv/.edgellm-deps"
fi
# this checkout (tracked and untracked-but-not-ignored files) -> /opt/edgellm-src
SRC_HASH=$(cd "$REPO" && git ls-files -co --exclude-standard -- edgellm runtime export benchmarks pyproject.toml \
  | sort | xargs -d '\n' sha256sum 2>/dev/null | sha256sum | cut -c1-16)
if [ "$(cat "$CACHE/src-hash" 2>/dev/null)" != "$SRC_HASH" ]; then
  log "device install of this checkout (pip install ., base dependencies)"
  rm -rf "$ROOT/opt/edgellm-src"
  mkdir -p "$ROOT/opt/edgellm-src"
  (cd "$REPO" && git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) \
    | tar -xf - -C "$ROOT/opt/edgellm-src"
  in_root sh -c 'cd /opt/edgellm-src && pip install -q --prefer-binary --no-build-isolation .'
  rm -rf "$CACHE"/numba-*     # new sources: the old machine code is stale
  echo "$SRC_HASH" > "$CACHE/src-hash"
fi
T_SETUP=$((SECONDS - T0))
log "root ready ($T_SETUP s): $(in_root python -c 'import numpy, numba, platform; print(platform.machine(), "numpy", numpy.__version__, "numba", numba.__version__)')"

# ----------------------------------------------------------------------------- 4. x86 reference
REF_HASH=$(cat "$REPO/scripts/arm64_parity.py" "$CACHE/src-hash" | sha256sum | cut -c1-16)
if [ "$(cat "$CACHE/ref/hash" 2>/dev/null)" != "$REF_HASH" ]; then
  log "x86 reference: tiny models -> quantize -> export -> x86 runtime tokens/logits"
  rm -rf "$CACHE/ref.tmp"
  "$HOST_PY" "$REPO/scripts/arm64_parity.py" reference "$CACHE/ref.tmp"
  echo "$REF_HASH" > "$CACHE/ref.tmp/hash"
  log "x86 reference done ($((SECONDS - T0 - T_SETUP)) s)"
  rm -rf "$CACHE/ref"
  mv "$CACHE/ref.tmp" "$CACHE/ref"
fi
cp "$REPO/scripts/arm64_parity.py" "$CACHE/arm64_parity.py"
# kernel tests without tests/conftest.py (it imports torch, which the device install lacks)
rm -rf "$CACHE/tests"
mkdir -p "$CACHE/tests"
for t in "${KERNEL_TESTS[@]}"; do
  [ -f "$REPO/$t" ] && cp "$REPO/$t" "$CACHE/tests/"
done

# ----------------------------------------------------------------------------- 5. per CPU
STATUS=0
SUMMARY=()
for cpu in "${CPUS[@]}"; do
  t=$SECONDS
  run_cpu() { in_root QEMU_CPU="$cpu" NUMBA_CPU_NAME="$cpu" NUMBA_CACHE_DIR="/var/cache/edgellm/numba-$cpu" "$@"; }
  log "$cpu: $(run_cpu python /var/cache/edgellm/arm64_parity.py describe)"
  log "$cpu: kernel tests ($(cd "$CACHE/tests" && ls | tr '\n' ' '))"
  select="not test_neon or $NEON_SELECT"; scope=all
  if [ "$QUICK" = 1 ]; then select=$QUICK_SELECT; scope=quick; fi
  if run_cpu sh -c "cd /var/cache/edgellm/tests && python -m pytest -q -x -p no:cacheprovider -k '$select' ."; then
    kt=passed
  else
    kt=FAILED; STATUS=1
  fi
  kt="$kt ($((SECONDS - t)) s)"; t2=$SECONDS
  log "$cpu: tiny-model check against the x86 run"
  if run_cpu python /var/cache/edgellm/arm64_parity.py check /var/cache/edgellm/ref; then mc=passed; else mc=FAILED; STATUS=1; fi
  SUMMARY+=("$cpu: kernel tests ($scope) $kt, tiny models $mc ($((SECONDS - t2)) s), $((SECONDS - t)) s in all")
done

log "summary (setup $T_SETUP s, total $((SECONDS - T0)) s):"
for s in "${SUMMARY[@]}"; do log "  $s"; done
exit $STATUS
