"""`parallel.compile`: under `torch.compile` the layers swap their fused eager autograd nodes
(`_QKVNormRope`, `_QKNormRope`, `_LayerNormModulate`, `_RMSNormFunction`) and the complex-number RoPE
for plain compositions and a cos/sin rotation, which inductor can fuse. Both forms must compute the
same function; a compiled DiT must train like the eager one."""

from __future__ import annotations

import copy

import pytest
import torch

from modules.parallel import ParallelConfig, parallelize
from tests.contracts.backbone_contract import make_inputs, perturb_
from tests.contracts.test_backbones import IN_CHANNELS, TEXT_DIM, builder

TINY = ["dit_tiny", "dit_tiny_factorized", "dit_tiny_window", "llama_tiny", "mmdit_tiny", "frame_ar_tiny"]
FUSED_NODES = ("_QKVNormRopeBackward", "_QKNormRopeBackward", "_LayerNormModulateBackward", "_RMSNormFunctionBackward")


def _graph_nodes(out: torch.Tensor) -> set[str]:
    """Names of every autograd node behind `out`."""
    seen, stack, names = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def _step(model: torch.nn.Module, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor], set[str]]:
    model.zero_grad(set_to_none=True)
    out = model(inputs.x, inputs.t, inputs.cond)
    nodes = _graph_nodes(out)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    (out - target).square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, nodes


@pytest.mark.parametrize("name", TINY)
def test_compile_forms_are_the_same_function(name, monkeypatch):
    """float64, the compile forms selected by pretending to be traced: same output and gradients as the
    fused eager nodes to rounding, and none of the fused nodes in the graph."""
    torch.manual_seed(0)
    model = perturb_(builder(name)().double(), std=0.05)  # zero-initialised gates would hide paths
    inputs = make_inputs(IN_CHANNELS, TEXT_DIM, grid=(4, 8, 8), batch=2)
    inputs.x, inputs.cond.tokens = inputs.x.double(), inputs.cond.tokens.double()
    out, grads, eager_nodes = _step(model, inputs)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out_c, grads_c, compile_nodes = _step(model, inputs)
    assert not compile_nodes & set(FUSED_NODES), compile_nodes & set(FUSED_NODES)
    assert eager_nodes & set(FUSED_NODES)  # the eager model did use them: the two runs differ in form
    torch.testing.assert_close(out_c, out, rtol=1e-10, atol=1e-12)
    assert grads.keys() == grads_c.keys()
    for key in grads:
        torch.testing.assert_close(grads_c[key], grads[key], rtol=1e-9, atol=1e-12, msg=key)


def test_compiled_dit_blocks_match_eager():
    """`parallel.compile: true` on a DiT: every block compiled, fp32 output and gradients as eager."""
    torch.manual_seed(0)
    eager = perturb_(builder("dit_tiny")(), std=0.05)
    compiled = copy.deepcopy(eager)
    parallelize(compiled, None, ParallelConfig(compile=True))
    inputs = make_inputs(IN_CHANNELS, TEXT_DIM, grid=(4, 8, 8), batch=2)
    out, grads, _ = _step(eager, inputs)
    out_c, grads_c, _ = _step(compiled, inputs)
    torch.testing.assert_close(out_c, out, rtol=1e-4, atol=1e-5)
    for key, grad in grads.items():
        compiled_key = key.replace("_orig_mod.", "")
        match = [g for k, g in grads_c.items() if k.replace("_orig_mod.", "") == compiled_key]
        assert len(match) == 1, key
        torch.testing.assert_close(match[0], grad, rtol=1e-3, atol=1e-5, msg=key)


def test_causal3d_compiled_norm_silu_is_the_same_function():
    """``CausalVAE3d(compile=True)`` fuses every norm → SiLU with torch.compile: the same reconstruction
    and gradients as eager in float32. (One training pass: the fused function acts per position like
    the eager one, whose chunked equivalence tests/test_causal3d.py checks.)"""
    from experiments.build import instantiate
    from experiments.config import REPO_CONFIGS, load_yaml

    path = REPO_CONFIGS / "vae" / "causal3d_tiny.yaml"
    torch.manual_seed(0)
    eager = instantiate({**load_yaml(path), "residual": True}, str(path))
    fused = instantiate({**load_yaml(path), "residual": True, "compile": True}, str(path))
    fused.load_state_dict(eager.state_dict())
    flags = [m.compiled for m in fused.modules() if hasattr(m, "compiled")]
    assert len(flags) == 36 and all(flags)  # every RMSNorm of the tiny residual model
    x = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def step(model):
        out = model.decode_raw(model.posterior(x).mode())
        (out - x).square().mean().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters()}

    (ref, g_ref), (got, g_got) = step(eager), step(fused)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    for n in g_ref:
        torch.testing.assert_close(g_got[n], g_ref[n], atol=1e-5, rtol=1e-3, msg=n)
