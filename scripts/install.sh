#!/usr/bin/env bash
# Idempotent installer for hpcaux on a Debian machine (root): system packages, a venv at
# .venv, the pinned stack of constraints.txt, h5py built against parallel HDF5 and Horovod
# built from its sdist (patched for C++20). Built wheels are cached in
# $HPCAUX_WHEEL_CACHE (default ~/.cache/hpcaux/wheels) so a second run builds nothing,
# and a stamp in the venv makes a run with nothing changed return in about a second.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
WHEELS="${HPCAUX_WHEEL_CACHE:-$HOME/.cache/hpcaux/wheels}"
CONSTRAINTS="$ROOT/constraints.txt"
APT_PACKAGES=(openmpi-bin libopenmpi-dev libhdf5-openmpi-dev hdf5-tools pkg-config cmake g++ make
              slurm-wlm munge iproute2)
HDF5_MPI_DIR=/usr/lib/x86_64-linux-gnu/hdf5/openmpi

log() { echo "[install] $*" >&2; }
pinned() { sed -n "s/^$1==\(.*\)$/\1/p" "$CONSTRAINTS"; }

stamp_value() {
  cat "$CONSTRAINTS" setup.py scripts/install.sh | sha256sum | cut -d' ' -f1
}

install_apt_packages() {
  if dpkg -s "${APT_PACKAGES[@]}" >/dev/null 2>&1; then return; fi
  log "installing system packages: ${APT_PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
}

create_venv() {
  if [ -x "$VENV/bin/python" ]; then return; fi
  log "creating $VENV"
  python3 -m venv "$VENV"
}

pip_install() { "$VENV/bin/pip" install -q -c "$CONSTRAINTS" "$@"; }

install_python_stack() {
  log "installing the pinned Python stack (torch is several GB the first time)"
  pip_install torch torchvision numpy mpi4py PyYAML tqdm matplotlib pytest pytest-timeout \
              Cython pkgconfig psutil cloudpickle packaging
}

# Build $1==version into the cache with the given command unless a wheel is there.
cached_wheel() {
  local name=$1 version=$2; shift 2
  ls "$WHEELS/$name-$version-"*.whl >/dev/null 2>&1 && return
  mkdir -p "$WHEELS"
  "$@"
}

build_parallel_h5py() {
  local version=$1
  log "building h5py $version against parallel HDF5 (about 3 minutes, once)"
  CC=mpicc HDF5_MPI=ON HDF5_DIR="$HDF5_MPI_DIR" \
    "$VENV/bin/pip" wheel -q --no-deps --no-binary=h5py --no-build-isolation \
    -c "$CONSTRAINTS" -w "$WHEELS" "h5py==$version"
}

build_horovod() {
  local version=$1
  HOROVOD_BUILD_DIR=$(mktemp -d)
  local work=$HOROVOD_BUILD_DIR
  # Also when the build fails; the trap runs at exit, after this function's locals are gone.
  trap 'rm -rf "${HOROVOD_BUILD_DIR:-}"' EXIT
  log "building Horovod $version for torch $(pinned torch) (about 4 minutes, once)"
  "$VENV/bin/pip" download -q --no-deps --no-binary :all: -d "$work" "horovod==$version"
  tar xzf "$work/horovod-$version.tar.gz" -C "$work"
  local src="$work/horovod-$version"
  # torch >= 2.10 headers need C++20; Horovod 0.28.1 asks for C++14/17 in three places.
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 20)/' \
    "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  sed -i 's/set(CMAKE_CXX_STANDARD 17)\\n/set(CMAKE_CXX_STANDARD 20)\\n/' "$src/CMakeLists.txt"
  # /usr/local/bin/nvcc would make CMake take /usr/local as the CUDA root: name the real one.
  ( cd "$src" && PATH=/usr/local/cuda/bin:/usr/bin:$PATH CUDA_HOME=/usr/local/cuda \
      CUDAToolkit_ROOT=/usr/local/cuda \
      HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
      HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=MPI \
      MAKEFLAGS="-j$(nproc)" \
      "$VENV/bin/pip" wheel -q --no-deps --no-build-isolation -w "$WHEELS" . )
}

install_source_builds() {
  local h5py_version horovod_version
  h5py_version=$(pinned h5py)
  horovod_version=$(pinned horovod)
  cached_wheel h5py "$h5py_version" build_parallel_h5py "$h5py_version"
  # Horovod links against torch's C++ ABI: its cached wheel is only valid for that torch.
  WHEELS="$WHEELS/torch-$(pinned torch)" \
    cached_wheel horovod "$horovod_version" build_horovod "$horovod_version"
  "$VENV/bin/pip" install -q --no-deps --force-reinstall \
    "$WHEELS"/h5py-"$h5py_version"-*.whl \
    "$WHEELS/torch-$(pinned torch)"/horovod-"$horovod_version"-*.whl
}

main() {
  install_apt_packages
  create_venv
  local want
  want=$(stamp_value)
  if [ "$(cat "$VENV/.hpcaux-stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  install_python_stack
  install_source_builds
  "$VENV/bin/pip" install -q --no-deps -e "$ROOT"
  "$VENV/bin/python" -c 'import h5py, horovod.torch, hpcaux;
assert h5py.get_config().mpi, "h5py was built without MPI"'
  echo "$want" > "$VENV/.hpcaux-stamp"
  log "done: $VENV"
}

main "$@"
