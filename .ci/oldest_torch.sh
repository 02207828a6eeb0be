#!/usr/bin/env bash
# CI's second pass: the core tests (model and memory, parallel, checkpoint, eval, kernels) on
# the oldest torch that pyproject.toml allows, 2.11 (the lent GPU machines run it).
#
# PyPI has no CPU-only wheel of torch 2.11, only its CUDA build, whose NVIDIA libraries are
# several GB of packages. This pass installs the torch wheel alone (--no-deps, ~530 MB, kept
# in ~/.cache/lingua_mem/wheels for the next run), builds stand-ins for the CUDA libraries it
# links (.ci/cuda_stubs.py: a few KB, never called on a CPU), and takes every other package
# from the main .venv, which must exist (the README's test command made it).
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST=${OLDEST_TORCH:-2.11.0}
venv=.venv-torch$OLDEST
cache=${XDG_CACHE_HOME:-$HOME/.cache}/lingua_mem/wheels
[ -x .venv/bin/python ] || { echo "oldest_torch: no .venv: run the README's test command first" >&2; exit 1; }
mkdir -p "$cache"
wheel=$(ls "$cache"/torch-"$OLDEST"-cp3*-manylinux*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  .venv/bin/pip download -q --no-deps "torch==$OLDEST" -d "$cache"
  wheel=$(ls "$cache"/torch-"$OLDEST"-cp3*-manylinux*.whl | head -n1)
fi
if ! "$venv/bin/python" -c "import sys; sys.exit(0)" 2>/dev/null \
    || [ "$("$venv/bin/pip" show torch 2>/dev/null | sed -n 's/^Version: //p')" != "$OLDEST" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --no-deps "$wheel"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
main_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# after this venv's own site-packages: its torch comes first, the rest from the main venv
echo "import site; site.addsitedir('$(realpath "$main_site")')" > "$site/zz_main_venv.pth"
"$venv/bin/python" .ci/cuda_stubs.py "$site/torch" "$venv/cuda-stubs"
export LD_LIBRARY_PATH="$PWD/$venv/cuda-stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$venv/bin/python" -c "import torch; assert torch.__version__.startswith('$OLDEST'), torch.__version__; \
print('oldest_torch: torch', torch.__version__, 'from', torch.__file__)"
"$venv/bin/python" -m pytest -q -n 2 --dist loadfile -p no:cacheprovider \
  tests/test_memory.py tests/test_value_optim.py tests/test_parallel.py tests/test_checkpoint.py \
  tests/test_eval.py tests/test_kernels.py tests/test_format.py
