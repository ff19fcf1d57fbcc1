#!/usr/bin/env bash
# Run the fast tests (`python -m pytest -q -m "not slow"`) in fresh virtual environments holding the LOWEST and
# the NEWEST versions that pyproject.toml allows for torch, transformers and datasets (the rest resolved by pip),
# so that every declared range is one the tests have run on. Not part of the default CI (it installs several GB).
#
#   bench/dependency_bounds.sh [lowest|newest|both]      (default both; work in $KNOWCAT_BOUNDS_DIR)
#
# The EntityQuestions tests read the real data: set KNOWCAT_ENTITYQUESTIONS to its folder when it is not
# ../shared/data/entityquestions beside the checkout (they error out without it, whatever the versions).
# Prints, per environment, the versions installed and pytest's closing line; writes both to
# $KNOWCAT_BOUNDS_DIR/<env>.log; exits non-zero when an environment fails to install or its tests fail.
# A failing bound is fixed by narrowing its range in pyproject.toml, never by skipping tests.
set -uo pipefail
cd "$(dirname "$0")/.."
which="${1:-both}"
work="${KNOWCAT_BOUNDS_DIR:-${TMPDIR:-/tmp}/knowcat_bounds}"
py="${PYTHON:-python3}"
unset PYTHONPATH  # the environment's own packages only (an editable install of this checkout among them)
pinned=(torch transformers datasets)

# the lower bound of a requirement in pyproject.toml ("torch>=2.13,<2.15" -> 2.13)
lower() { "$py" - "$1" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
name = sys.argv[1]
spec = next(d for d in deps if re.match(rf"{re.escape(name)}\b", d))
print(re.search(r">=\s*([0-9][^,;\s]*)", spec).group(1))
PY
}

run_env() {  # $1: name, $2...: pip requirement specifiers for the pinned packages
  local name="$1"; shift
  local venv="$work/$name" log="$work/$name.log"
  rm -rf "$venv" && "$py" -m venv "$venv" || return 1
  "$venv/bin/pip" install -q --upgrade pip >/dev/null
  echo "== $name: installing knowcat[test] ${*:-(newest allowed)}" | tee "$log"
  if ! "$venv/bin/pip" install -q -e ".[test]" "$@" >>"$log" 2>&1; then
    tail -20 "$log"; echo "== $name: INSTALL FAILED" | tee -a "$log"; return 1
  fi
  "$venv/bin/python" - "$name" <<'PY' | tee -a "$log"
import sys
from importlib.metadata import version
names = ["torch", "transformers", "datasets", "tokenizers", "huggingface-hub", "accelerate", "peft", "numpy",
         "pandas", "pyarrow", "ray", "python"]
print(f"== {sys.argv[1]} versions: " + ", ".join(
    f"{n} {version(n) if n != 'python' else sys.version.split()[0]}" for n in names))
PY
  local root="$PWD"
  (cd "$venv" && "$venv/bin/python" -c "import knowcat, sys; sys.exit(0 if knowcat.__file__.startswith('$root/') else 1)") \
    || { echo "== $name: knowcat is not this checkout's"; return 1; }
  "$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider --basetemp "$work/$name.pytest" >>"$log" 2>&1
  local rc=$?
  grep -E "^(FAILED|ERROR) " "$log" | head -20
  echo "== $name: $(tail -1 "$log") (exit code $rc)" | tee -a "$log"
  return $rc
}

mkdir -p "$work"
status=0
if [ "$which" = lowest ] || [ "$which" = both ]; then
  lows=(); for p in "${pinned[@]}"; do lows+=("$p==$(lower "$p")"); done
  run_env lowest "${lows[@]}" || status=1
fi
if [ "$which" = newest ] || [ "$which" = both ]; then
  # the newest each range allows: a fresh environment resolves to them under the declared upper bounds
  run_env newest || status=1
fi
exit $status
