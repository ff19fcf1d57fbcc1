#!/usr/bin/env bash
# Run the fast tests in fresh virtual environments holding the LOWEST and the NEWEST versions that
# pyproject.toml allows for torch, transformers and datasets (the rest resolved by pip), so that every
# declared range is one the tests have run on. Not part of the default CI (it downloads several GB).
#
#   bench/dependency_bounds.sh [lowest|newest|both]      (default both; work in $KNOWCAT_BOUNDS_DIR)
#
# The EntityQuestions tests read the real data: set KNOWCAT_ENTITYQUESTIONS to its folder when it is not
# ../shared/data/entityquestions beside the checkout (they error out without it, whatever the versions).
# Prints, per environment, the versions installed and the tests' result; exits non-zero when one fails.
# A failing bound is fixed by narrowing its range in pyproject.toml, never by skipping tests.
set -uo pipefail
cd "$(dirname "$0")/.."
which="${1:-both}"
work="${KNOWCAT_BOUNDS_DIR:-${TMPDIR:-/tmp}/knowcat_bounds}"
py="${PYTHON:-python3}"
# the fast tests: no quick-demo model, but torch, transformers (tokenizer, Llama, Trainer) and datasets used
fast=(tests/test_loaders.py tests/test_entityquestions.py tests/test_mixtures.py tests/test_lstsq.py
      tests/test_filter.py tests/test_pretrain.py tests/test_world.py)

# the lower bound of a requirement in pyproject.toml ("torch>=2.3,<2.15" -> 2.3)
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
  local venv="$work/$name"
  rm -rf "$venv" && "$py" -m venv "$venv" || return 1
  "$venv/bin/pip" install -q --upgrade pip >/dev/null
  echo "== $name: installing knowcat[test] ${*:-(newest allowed)}"
  if ! "$venv/bin/pip" install -q -e ".[test]" "$@"; then
    echo "== $name: INSTALL FAILED"; return 1
  fi
  "$venv/bin/python" -c "import torch, transformers, datasets; print('== $name versions: torch', torch.__version__, '| transformers', transformers.__version__, '| datasets', datasets.__version__)"
  "$venv/bin/python" -m pytest -q -x -p no:cacheprovider "${fast[@]}"
  local rc=$?
  echo "== $name: fast tests exit code $rc"
  return $rc
}

mkdir -p "$work"
status=0
if [ "$which" = lowest ] || [ "$which" = both ]; then
  run_env lowest "torch==$(lower torch)" "transformers==$(lower transformers)" "datasets==$(lower datasets)" || status=1
fi
if [ "$which" = newest ] || [ "$which" = both ]; then
  # the newest each range allows: a fresh environment resolves to them under the declared upper bounds
  run_env newest || status=1
fi
exit $status
