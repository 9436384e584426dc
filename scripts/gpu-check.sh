#!/usr/bin/env bash
# The GPU check (docs/gpu.md), run as one command on a lent GPU machine from the repository root, with the
# bundle of scripts/gpu-bundle.sh carried as .gpu/:
#
#   scripts/gpu-check.sh              on the GPU machine: its Python 3.12 and torch, plus .gpu/site.tar.xz
#   scripts/gpu-check.sh --dry-run    here: the same steps on CPU over .venv (CI runs it)
#
# Results: $OUT/gpu-check.json, $OUT/steps.log, $OUT/servers.log ($OUT defaults to ./gpu-check-out).
# Extra arguments go to `python -m triton_vlm_clients.gpu_check` (--budget-s, --steps).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu-check-out}
TMP=${TMPDIR:-/tmp}/triton-vlm-gpu-check.$$
mkdir -p "$OUT" "$TMP"
trap 'rm -rf "$TMP"' EXIT

PATHS=()
if [ "${1:-}" = "--dry-run" ]; then
  [ -x .venv/bin/python ] || ./scripts/setup.sh
  BASE=$ROOT/.venv/bin/python
  BASE_SITE=$("$BASE" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
else
  BASE=${GPU_PYTHON:-$(command -v python3)}
  [ -f .gpu/site.tar.xz ] || { echo "no .gpu/site.tar.xz: run scripts/gpu-bundle.sh here, carry .gpu" >&2; exit 2; }
  mkdir -p "$TMP/site"
  start=$(date +%s)
  tar -C "$TMP/site" -xJf .gpu/site.tar.xz || exit 2
  echo "bundle unpacked in $(( $(date +%s) - start )) s"
  PATHS+=("$TMP/site")
  export TRITON_VLM_HOME=$TMP/home
  export USE_FLAX=0 USE_TF=0  # transformers would import the machine's jax (and grab its GPU) for nothing
  # The machine's packages, less those we bring and those built for its numpy 2, which transformers would
  # import when it finds them (scipy, scikit-learn, torchvision, accelerate...): as on our CPU machines.
  base_site=$("$BASE" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$TMP/base"
  for entry in "$base_site"/*; do
    name=$(basename "$entry")
    case "${name%%-[0-9]*}" in
      numpy|numpy.libs|scipy|scipy.libs|sklearn|scikit_learn|scikit_learn.libs|jax|jaxlib|jax_plugins|jax_cuda13_*|\
      pandas|numba|numba_cuda|cupy|cupyx|cupy_backends|cupy_cuda13x|matplotlib|skimage|scikit_image|h5py|\
      tensorstore|onnxruntime|cv2|opencv_python_headless*|torchvision|torchvision.libs|timm|accelerate|peft|\
      transformers|tokenizers|huggingface_hub) continue ;;
    esac
    ln -s "$entry" "$TMP/base/$name"
  done
  BASE_SITE=$TMP/base
fi

# The python backend stub runs an isolated interpreter: it ignores PYTHONPATH and takes the site-packages
# of the first python3 on PATH (launcher.server_env puts this one's first). So the check runs in a venv
# over the machine's Python whose site-packages holds one .pth: the bundle, our code, then the base
# interpreter's own packages (torch), each stub sees the same.
"$BASE" -m venv --without-pip "$TMP/venv" || exit 2
PY=$TMP/venv/bin/python3
{
  printf '%s\n' "${PATHS[@]}" "$ROOT/backends" "$ROOT/clients" "$ROOT"
  echo "import site; site.addsitedir('$BASE_SITE')"
} > "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/triton-vlm.pth"
# the stub links libpython3.X.so.1.0, found in the interpreter's LIBDIR (launcher.server_env)
"$PY" -c 'import sysconfig, os; d, n = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME"); print("libpython:", os.path.join(d, n), os.path.exists(os.path.join(d, n)))'
export PYTHONUNBUFFERED=1
"$PY" -m triton_vlm_clients.gpu_check --out "$OUT" "$@"
