"""benchmarks/sd_cost.py at test size on the CPU: FLOP counts per part, their ratios, the table's rows, the JSON."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sd_cost
from sd_cost_models import SIZES, build_models


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd_cost") / "tiny.json"
    result = sd_cost.main(["--size", "tiny", "--device", "cpu", "--reps", "1", "--warmup", "0", "--sdpa-vae",
                           "--bf16-backward", "--cuda-graphs", "--max-batch", "--json-out", str(out)])
    return result, out


def test_flops_positive_and_written(tiny_run):
    result, out = tiny_run
    flops = result["flops"]
    assert set(flops["parts"]) == set(sd_cost.PARTS)
    assert all(v > 0 for v in flops["parts"].values())
    assert flops["tiny_decoder_fwd"] > 0 and flops["tiny_decoder_bwd"] > 0
    assert json.loads(out.read_text())["flops"] == json.loads(json.dumps(flops))


def test_decoder_backward_flops_against_forward(tiny_run):
    """Frozen decoder: the backward computes input gradients only, and an input gradient of a convolution or
    linear layer costs exactly its forward's multiply-adds; only the mid-block attention's backward costs
    more (two matmuls per forward matmul). So bwd / fwd is 1 plus the attention's small share: 1.01 at SD 1.5,
    1.05 at SDXL / FLUX, 1.03 here; [0.99, 1.15] holds for all of them. With checkpointing the backward also
    recomputes the mid and up blocks' forward (non-reentrant checkpointing stops once the saved tensors it needs
    are back), so it lies between 1.15 and 2.05 (1.65-1.75 measured)."""
    flops = tiny_run[0]["flops"]
    fwd, bwd = flops["parts"]["decoder_fwd"], flops["parts"]["decoder_bwd"]
    assert 0.99 <= bwd / fwd <= 1.15
    assert 1.15 < flops["decoder_bwd_checkpointed"] / fwd <= 2.05
    # the classifier is frozen too: its input-gradient backward costs its forward, within the same margin
    assert 0.99 <= flops["parts"]["classifier_bwd"] / flops["parts"]["classifier_fwd"] <= 1.15


def test_backward_is_twice_forward_with_weight_gradients():
    """The textbook 2x: when the weight gradients are asked for too, every convolution / linear layer adds one
    more forward-sized matmul, so the counted decoder backward is 2x its forward plus the attention's extra.
    This checks the counter, and that the ~1x above comes from asking for input gradients only."""
    meta = build_models(SIZES["tiny"], "meta", torch.float32, 1)
    decode = sd_cost.LatentDecoder(meta.vae)
    params = [p.requires_grad_(True) for p in meta.vae.decoder.parameters()]
    z0 = sd_cost.latents(SIZES["tiny"], 1, "meta", torch.float32).requires_grad_(True)
    with FlopCounterMode(display=False) as forward:
        images = decode(z0)
    with FlopCounterMode(display=False) as backward:
        torch.autograd.grad(images, [z0, *params], torch.ones_like(images))
    assert 1.99 <= backward.get_total_flops() / forward.get_total_flops() <= 2.2


def test_flops_linear_in_batch(tiny_run):
    """Every op is per sample, so the counts at the run's batch 2 are exactly twice those at batch 1."""
    spec = SIZES["tiny"]
    meta = build_models(spec, "meta", torch.float32, 1)
    z = sd_cost.latents(spec, 1, "meta", torch.float32)
    one = sd_cost.count_flops(sd_cost.step_parts(meta, sd_cost.plain_path(meta), z, sd_cost.step_point(spec),
                                                 meta.cond, "total"))
    assert tiny_run[0]["batch"] == 2
    assert {k: 2 * v for k, v in one.items()} == tiny_run[0]["flops"]["parts"]


def test_rows_and_skips(tiny_run):
    result = tiny_run[0]
    names = [v["name"] for v in result["variants"]]
    assert names == ["unguided", "full decoder", "full decoder, checkpointed", "tiny decoder (AutoencoderTiny)"]
    assert all(v["step"]["seconds"] > 0 for v in result["variants"])
    assert result["vae_attention_default"] == "AttnProcessor2_0"
    levers = {r["name"]: r for r in result["levers"]}
    # "all of them" needs two levers that combine; the non-SDPA attention is a comparison, not a lever to combine
    assert set(levers) == {"baseline (VAE attention: SDPA)", "VAE attention without SDPA",
                           "bf16 guidance path + fp32 fallback"}
    assert not [r for r in levers.values() if "error" in r]
    assert all(r["parts"]["decoder_bwd"]["ms_per_image"] > 0 for r in levers.values())
    assert set(result["skipped"]) == {"cuda-graphs", "max-batch"}
    assert result["parts"]["decoder_bwd"]["peak_share"] is None  # no peak on a CPU


def test_max_batch_doubles_then_bisects(monkeypatch):
    monkeypatch.setattr(sd_cost, "fits", lambda m, b, *a: None if b <= 37 else f"OOM at {b}")
    assert sd_cost.max_batch(None, None, "total", 1.0, cap=256) == (
        37, [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37], "OOM at 38")
    assert sd_cost.max_batch(None, None, "total", 1.0, cap=8) == (8, [1, 2, 4, 8], "")


def test_fallback_recomputes_nonfinite_samples():
    """The bf16 lever's guard: samples whose gradient is non-finite on the fast path are redone on the fallback
    path (exactly the fallback's gradient for them); without a fallback they keep longtail_grad's zero."""
    spec = SIZES["tiny"]
    m = build_models(spec, "cpu", torch.float32, 2)
    good = sd_cost.plain_path(m)

    def broken(z):  # the first sample's image overflows, as a bf16 / fp16 decoder can
        return good.decode(z) * torch.tensor([float("inf"), 1.0]).view(2, 1, 1, 1)

    fast = sd_cost.GuidePath("broken", broken, good.classify, torch.float32, fallback=good)
    z, point = sd_cost.latents(spec, 2, "cpu", torch.float32), sd_cost.step_point(spec)
    with torch.no_grad():
        eps = sd_cost.denoise(m, z, point, m.cond)
    grad, nonfinite, fallbacks = sd_cost.guidance_grad(m, fast, z, eps, point, "total")
    alone, _, _ = sd_cost.guidance_grad(m, good, z[:1], eps[:1], point, "total")
    unguarded, nonfinite_0, fallbacks_0 = sd_cost.guidance_grad(m, replace(fast, fallback=None), z, eps, point,
                                                               "total")
    assert (nonfinite, fallbacks, nonfinite_0, fallbacks_0) == (0, 1, 1, 0)
    assert torch.equal(grad[:1], alone) and bool(alone.abs().sum() > 0)
    assert torch.equal(grad[1:], unguarded[1:]) and bool((unguarded[0] == 0).all())


def test_no_fit_reasons():
    assert sd_cost.no_fit_reason(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nmore")).startswith(
        "RuntimeError: CUDA out of memory.")
    assert sd_cost.no_fit_reason(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")) is not None
    assert sd_cost.no_fit_reason(RuntimeError("shape mismatch")) is None


def test_pack_roundtrip_and_peak_table():
    z = torch.randn(2, 16, 8, 6)
    assert sd_cost.pack(z).shape == (2, 12, 64)
    assert torch.equal(sd_cost.unpack(sd_cost.pack(z), (16, 8, 6)), z)
    assert sd_cost.peak_tflops(torch.device("cpu"), torch.float16, None) is None
    assert sd_cost.peak_tflops(torch.device("cpu"), torch.float16, 123.0) == 123.0
