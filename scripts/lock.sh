#!/usr/bin/env bash
# Regenerate requirements.lock (runtime) and requirements-dev.lock (test/lint tools) from the
# human-edited requirements.txt and requirements-dev.txt.
#
# When to run it: after any change to a requirement line in requirements.txt or
# requirements-dev.txt (comments do not count), and when you deliberately upgrade:
#   scripts/lock.sh                        # relock; keeps every pin the old lock had if it still fits
#   scripts/lock.sh --upgrade-package X    # move X (and only what X forces) to its newest release
#   scripts/lock.sh --upgrade              # move everything to the newest releases that resolve
#   scripts/lock.sh --from-venv            # prefer the versions installed in .venv (the tested set)
# Then run scripts/setup.sh and the tests, and commit the .txt and .lock files together.
# scripts/setup.sh refuses to install when a requirements file changed after its lock.
#
# What it guarantees:
# - every package of the resolution, transitive ones included, is pinned with ==, for
#   CPython 3.11 on Linux x86-64 (glibc >= 2.35; nvidia-pytriton ships manylinux_2_35 wheels);
# - reproducible: a pinned uv (UV_VERSION below), PyPI only (no user or site uv/pip config,
#   no local wheel folders), and the existing locks as preferences, so rerunning it on
#   unchanged inputs rewrites the same files; --upgrade/--upgrade-package are the only ways
#   to move a pin that still satisfies the requirements;
# - the dev lock is resolved against the runtime lock (-c requirements.lock): a package in
#   both files has the same pin, and `pip install -r requirements.lock -r requirements-dev.lock`
#   is one consistent set;
# - each lock's header records a sha256 of the requirement lines (comments and blank lines
#   dropped) of the files it came from; scripts/setup.sh and tests/test_lock.py compare it.
#
# torch: the platform runs the CPU build of torch 2.13.0 (scripts/setup.sh installs it first;
# the Airflow image takes it from the PyTorch CPU index). PyPI's Linux x86-64 torch 2.13.0 is
# the CUDA build, whose metadata adds cuda-toolkit, cuda-bindings, nvidia-*-cu13 and triton
# (several GB) that the CPU build does not need. The lock pins torch==2.13.0 (which the local
# +cpu build satisfies: PEP 440 ignores the local label) and leaves those packages out: a first
# resolution finds every nvidia-*/cuda-*/triton package that only torch pulls in, a second one
# runs with them passed to `uv pip compile --excludes`, so neither they nor their own
# dependencies reach the lock. If such a package were needed by something other than torch
# (nvidia-pytriton is not one of them: it is a real runtime dependency), the script stops.
# Hashes: not recorded. pip's hash checking is all-or-nothing per install, and torch comes
# from another index than PyPI (the CPU build's hashes are not PyPI's), while the Triton image
# uses this lock as constraints for Python 3.10 wheels whose hashes differ from cp311's.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
PYTHON_VERSION=3.11
PLATFORM=x86_64-manylinux_2_35
INDEX=https://pypi.org/simple
# nvcr.io/nvidia/tritonserver:24.10-py3: Ubuntu 22.04 (glibc 2.35), CPython 3.10.
TRITON_PLATFORM=x86_64-manylinux_2_35
TRITON_INPUT=deploy/docker/triton-requirements.txt

upgrade=()
from_venv=0
while [ $# -gt 0 ]; do
  case "$1" in
    --upgrade) upgrade+=(--upgrade) ;;
    --upgrade-package) upgrade+=(--upgrade-package "$2"); shift ;;
    --from-venv) from_venv=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "lock.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# A pinned uv in its own cache venv (never in .venv): uv only resolves here, it installs nothing.
tools="${RECSYS_LOCK_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/recsys-lock}/uv-$UV_VERSION"
if [ ! -x "$tools/bin/uv" ]; then
  python3 -m venv "$tools"
  "$tools/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
fi
uv="$tools/bin/uv"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The hash that the lock header records and scripts/setup.sh / tests/test_lock.py recompute:
# sha256 of the file's lines with comments, trailing blanks and empty lines removed.
req_sha() { sed -e 's/[[:space:]]*#.*$//' -e 's/[[:space:]]*$//' -e '/^$/d' "$1" | sha256sum | cut -d' ' -f1; }

constraints=()
if [ "$from_venv" = 1 ]; then
  # The installed versions as constraints (torch's +cpu label dropped, the editable project out).
  .venv/bin/python -m pip freeze --all --exclude-editable \
    | grep -v -e '^-e ' -e '^pip==' -e ' @ ' | sed 's/+cpu$//' >"$work/venv-constraints.txt"
  constraints=(-c "$work/venv-constraints.txt")
fi

compile() { # compile OUT ARGS... (OUT seeded with the existing lock: uv keeps its pins)
  local out="$1"; shift
  "$uv" pip compile --quiet --no-config --no-header --annotation-style line \
    --python-version "$PYTHON_VERSION" --python-platform "$PLATFORM" --index-url "$INDEX" \
    --no-emit-index-url --no-emit-find-links "${upgrade[@]}" "${constraints[@]}" -o "$out" "$@"
}
seed() { if [ -f "$2" ]; then grep -v '^#' "$2" >"$1" || true; else : >"$1"; fi; }

# Pass 1: find the CUDA packages that PyPI's torch pulls in.
seed "$work/pass1.txt" requirements.lock
compile "$work/pass1.txt" requirements.txt
python3 - "$work/pass1.txt" "$work/excludes.txt" <<'PY'
import re
import sys

pins, parents = {}, {}
for line in open(sys.argv[1]):
    m = re.match(r"^([A-Za-z0-9._-]+)==(\S+)\s*(?:#\s*via\s+(.*))?$", line.strip())
    if m:
        name = m.group(1).lower()
        pins[name] = m.group(2)
        parents[name] = {p.strip().lower() for p in (m.group(3) or "").split(",") if p.strip()}
cuda = {n for n in pins if re.match(r"^(nvidia-|cuda-|triton$)", n) and n != "nvidia-pytriton"}
for name in sorted(cuda):
    others = parents[name] - cuda - {"torch"}
    if others:
        sys.exit(f"lock.sh: {name} is needed by {sorted(others)}, not only by CUDA torch: "
                 "decide by hand whether the CPU platform needs it")
open(sys.argv[2], "w").write("".join(f"{n}\n" for n in sorted(cuda)))
PY

# Pass 2: the runtime lock without them; then the dev tools on top of it.
seed "$work/runtime.txt" requirements.lock
compile "$work/runtime.txt" --excludes "$work/excludes.txt" requirements.txt
seed "$work/dev.txt" requirements-dev.lock
compile "$work/dev.txt" --excludes "$work/excludes.txt" -c "$work/runtime.txt" requirements-dev.txt

# The Triton image (Python 3.10): its own resolution of deploy/docker/triton-requirements.txt,
# wheels only, seeded with the runtime lock so that its versions win wherever they fit cp310.
seed "$work/triton.txt" requirements.lock
"$uv" pip compile --quiet --no-config --no-header --annotation-style line --python-version 3.10 \
  --python-platform "$TRITON_PLATFORM" --index-url "$INDEX" --only-binary :all: \
  --no-emit-index-url --no-emit-find-links "${upgrade[@]}" -o "$work/triton.txt" "$TRITON_INPUT"

if grep -hiE '^(nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+|triton)==' "$work/runtime.txt" "$work/dev.txt" \
   | grep -qv '^nvidia-pytriton=='; then
  echo "lock.sh: a CUDA package is still in the lock" >&2; exit 1
fi
excluded="$(paste -sd' ' "$work/excludes.txt")"

header() { # header TITLE INPUT...
  echo "# $1"
  echo "# Generated by scripts/lock.sh (uv $UV_VERSION, CPython $PYTHON_VERSION, $PLATFORM, PyPI)."
  echo "# Do not edit: change the requirement files below, then run scripts/lock.sh."
  echo "# torch==2.13.0 is the CPU build on this platform (installed first by scripts/setup.sh and"
  echo "# the Airflow image); the CUDA-only packages that PyPI's torch wheel depends on are left out:"
  echo "#   $excluded" | fold -s -w 98 | sed -e '2,$s/^/#   /' -e 's/ *$//'
  echo "# No hashes: torch's CPU build comes from another index than PyPI (see scripts/lock.sh)."
  local f
  for f in "${@:2}"; do echo "# input-sha256: $f $(req_sha "$f")"; done
}
{ header "Runtime lock: exact versions of every package the platform runs." requirements.txt
  sed 's/ *# via -c [^,]*venv-constraints.txt$//; s/-c [^,]*venv-constraints.txt, //; s/, -c [^,]*venv-constraints.txt//; s/-c [^,]*runtime.txt/-c requirements.lock/' "$work/runtime.txt"
} >requirements.lock
{ header "Dev lock: test and lint tools, resolved on top of requirements.lock." \
    requirements-dev.txt requirements.txt
  sed 's/ *# via -c [^,]*venv-constraints.txt$//; s/-c [^,]*venv-constraints.txt, //; s/, -c [^,]*venv-constraints.txt//; s/-c [^,]*runtime.txt/-c requirements.lock/' "$work/dev.txt"
} >requirements-dev.lock
{ echo "# Constraints of the Triton image (deploy/docker/triton.Dockerfile): CPython 3.10, $TRITON_PLATFORM."
  echo "# Generated by scripts/lock.sh (uv $UV_VERSION) from $TRITON_INPUT; do not edit."
  echo "# Its own file because requirements.lock is resolved for CPython 3.11 and some of its pins"
  echo "# have no cp310 wheel; the runtime lock's versions are kept wherever they have one."
  echo "# input-sha256: $TRITON_INPUT $(req_sha "$TRITON_INPUT")"
  cat "$work/triton.txt"
} >deploy/docker/triton-constraints.txt
echo "lock.sh: requirements.lock $(grep -c '==' requirements.lock) pins," \
  "requirements-dev.lock $(grep -c '==' requirements-dev.lock) pins; excluded: $excluded"
