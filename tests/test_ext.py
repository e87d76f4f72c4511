"""The extension switch: LRPFAST_DISABLE_EXT=1 runs the fallback with one warning (never an
import error), and build_info() says what was compiled."""
import json
import os
import subprocess
import sys

import pytest
import torch

import lrpfast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import lrpfast
    from lrpfast import ops
torch.manual_seed(0)
x, w = torch.rand(3, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
z = x @ w.T
r = torch.relu(z)
out = ops.linear_relprop(r, x, z, w)
print(json.dumps({
    "warnings": [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)],
    "has_ext": lrpfast.HAS_EXT, "info": lrpfast.build_info(), "out": out.tolist()}))
"""


def _run_child(env_extra):
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_disable_ext_runs_the_fallback_with_one_warning():
    child = _run_child({"LRPFAST_DISABLE_EXT": "1"})
    assert child["has_ext"] is False
    assert child["info"]["extension_loaded"] is False and "LRPFAST_DISABLE_EXT" in child["info"]["load_error"]
    assert len(child["warnings"]) == 1 and "fallback" in child["warnings"][0]
    # the same numbers as this process (extension when built): the two paths agree
    torch.manual_seed(0)
    x, w = torch.rand(3, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    z = x @ w.T
    expected = lrpfast.ops.linear_relprop(torch.relu(z), x, z, w)
    assert torch.allclose(torch.tensor(child["out"], dtype=torch.float64), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.skipif(not lrpfast.HAS_EXT, reason="extension not built")
def test_build_info_says_what_was_compiled():
    info = lrpfast.build_info()
    assert info["extension_loaded"] and info["cpu"] is True
    assert info["torch_compiled"].split("+")[0] == torch.__version__.split("+")[0]
    if info["cuda"]:
        assert info["cuda_archs"] and info["cuda_compiled"]
    else:
        assert info["cuda_archs"] == ""
    with_ext = _run_child({})
    assert with_ext["has_ext"] is True and with_ext["warnings"] == []
