# Sourced by scripts/demo and scripts/test: make .venv (once) and install the project into it.
# Re-installs only when pyproject.toml or the constraints change. CPU torch is pinned by
# constraints/cpu.txt; GPU hosts install their CUDA build of torch themselves.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python_bin="${PYTHON:-python3}"
# Say what is happening on stderr (a first install takes minutes; stdout may be a pipe someone parses),
# and nothing at all when the venv is already up to date.
if [ ! -x .venv/bin/python ]; then
  echo "scripts: first run: creating .venv and installing CyxWiz and CPU torch (a few minutes)" >&2
  "$python_bin" -m venv .venv
fi
stamp=".venv/.cyxwiz-installed"
want="$(cat pyproject.toml constraints/cpu.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if [ -f "$stamp" ]; then
    echo "scripts: pyproject.toml or constraints changed: updating the packages in .venv" >&2
  else
    echo "scripts: installing CyxWiz and its dependencies into .venv (pip; a few minutes the first time)" >&2
  fi
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints/cpu.txt -e ".[node,kernels,load,dev]"
  echo "$want" > "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
