"""scripts/mutation_check.py: every named break of a join is caught by the tests that guard it.

The quick test (default suite) checks that every mutation still applies to this tree and names tests
that exist, so a refactor that moves the patched code is noticed at once; the full check (`slow`) runs
the script: each mutation in a temporary copy of the repository, with the tests that must fail.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from tests.helpers.runs import BENCHMARK_DIR, OFFICIAL_FIXTURES, PROJECT_ROOT, SHARED_DIR, load_script

SCRIPT = PROJECT_ROOT / "scripts" / "mutation_check.py"


def test_every_mutation_applies_to_this_tree_and_names_existing_tests():
    script = load_script("mutation_check")
    names = [mutation.name for mutation in script.MUTATIONS]
    assert len(names) == len(set(names))
    assert sum(mutation.issue_row for mutation in script.MUTATIONS) >= 7
    assert sum(not mutation.issue_row for mutation in script.MUTATIONS) >= 5
    for mutation in script.MUTATIONS:
        for patch in mutation.patches:
            found = (PROJECT_ROOT / patch.path).read_text().count(patch.old)
            assert found == 1, (f"mutation {mutation.name!r} is stale: {patch.old.strip()!r} occurs {found} times in "
                                f"{patch.path}; move it to where that behaviour lives now (scripts/mutation_check.py)")
        assert mutation.tests, mutation.name
        for test in mutation.tests:
            path, _, name = test.partition("::")
            function = name.split("[")[0]
            tree = ast.parse((PROJECT_ROOT / path).read_text())
            defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
            assert function in defined, f"mutation {mutation.name!r} names {test}, which does not exist"


@pytest.mark.slow
@pytest.mark.long  # 25-40 minutes on 2 cores
@pytest.mark.skipif(not ((OFFICIAL_FIXTURES / "dlsn_tiny_x2.pt").is_file() and (BENCHMARK_DIR / "Set5").is_dir()),
                    reason=f"the mutations' tests need ../shared (fixtures and benchmarks) at {SHARED_DIR}")
def test_every_mutation_is_caught():
    env = {**os.environ, "DLSN_TEST_SHARED": str(SHARED_DIR), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=3600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
