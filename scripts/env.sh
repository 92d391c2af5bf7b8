# Sourced by the scripts: Open MPI as root, more ranks than cores, and the data archives.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
HPCAUX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HPCAUX_CIFAR_ARCHIVE="${HPCAUX_CIFAR_ARCHIVE:-$HPCAUX_ROOT/../shared/data/cifar10-jpeg.tar.gz}"
export HPCAUX_IMAGENETTE_ARCHIVE="${HPCAUX_IMAGENETTE_ARCHIVE:-$HPCAUX_ROOT/../shared/data/imagenette-128.tar.gz}"
export PATH="$HPCAUX_ROOT/.venv/bin:$PATH"

prepare_cifar10() {
  hpcaux data cifar10 "$HPCAUX_ROOT/data" --from "$HPCAUX_CIFAR_ARCHIVE"
}

# Imagenette (ImageNet folder layout, 128 px) into data/imagenette; a no-op once it is there.
prepare_imagenette() {
  hpcaux data imagenette "$HPCAUX_ROOT/data/imagenette" --from "$HPCAUX_IMAGENETTE_ARCHIVE"
}
