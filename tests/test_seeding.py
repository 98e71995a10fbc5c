"""The per-test seeds of conftest.py: stable across runs and processes, and named when a test fails."""
import os
import subprocess
import sys
import textwrap

import torch

from conftest import BASE_SEED, seed_for


def test_seeds_are_stable_per_node_id_and_base():
    assert seed_for("tests/test_x.py::test_a", 0) == seed_for("tests/test_x.py::test_a", 0)
    assert seed_for("tests/test_x.py::test_a", 0) != seed_for("tests/test_x.py::test_b", 0)
    assert seed_for("tests/test_x.py::test_a", 0) != seed_for("tests/test_x.py::test_a", 1)
    # a fixed function of the text (zlib.crc32), not Python's per-process randomized str hash
    assert seed_for("tests/test_x.py::test_a", 0) == 280737855


def test_this_test_draws_from_its_own_seed(request):
    want = torch.rand(3, generator=torch.Generator().manual_seed(seed_for(request.node.nodeid, BASE_SEED)))
    assert torch.equal(torch.rand(3), want)


def test_a_failure_names_the_seed_its_inputs_came_from(tmp_path):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    (tmp_path / "conftest.py").write_text(open(os.path.join(tests_dir, "conftest.py"), encoding="utf-8").read())
    (tmp_path / "test_fails.py").write_text(textwrap.dedent("""
        import torch

        def test_draw():
            print("DRAW", torch.rand(()).item())
            assert False
    """))

    env = dict(os.environ, DPO_FAST_TEST_SEED="5")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_fails.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300).stdout
    seed = seed_for("test_fails.py::test_draw", 5)
    assert f"seed {seed} (base 5); rerun with the same inputs: DPO_FAST_TEST_SEED=5" in out
    draw = float(next(line for line in out.splitlines() if line.startswith("DRAW")).split()[1])
    assert draw == torch.rand((), generator=torch.Generator().manual_seed(seed)).item()  # the named seed's draw
