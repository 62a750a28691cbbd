# Sourced by scripts/demo and scripts/test: make .venv (once) and install the project into it.
# Re-installs only when pyproject.toml or the constraints change. CPU torch is pinned by
# constraints/cpu.txt; GPU hosts install their CUDA build of torch themselves.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
stamp=".venv/.cyxwiz-installed"
want="$(cat pyproject.toml constraints/cpu.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints/cpu.txt -e ".[node,kernels,load,dev]"
  echo "$want" > "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
