"""A faster CPU float32 forward of CLIP's image tower: the same function as transformers', fewer memory passes.

Why it exists (measured, ``make bench``): on a CPU in float32, transformers' ``CLIPVisionModel`` forward spends a
fifth of its time outside the matrix products — copying each bias into a fresh output before its GEMM, three
element-wise passes (and two temporaries) for ``quick_gelu``, and first-touch page faults on the ~40 MB
activations it allocates in every layer. This module computes the same function from the model's own parameters
(no weight copies) with:

* residual additions done by the GEMMs themselves: ``x.addmm_(h, W.T)`` (BLAS ``beta = 1``, no extra pass);
* ``quick_gelu(h) = h·σ(αh) = silu(αh)/α`` with α = 1.702 applied by fc1's ``addmm`` (``alpha``/``beta``) and
  1/α by fc2's (``alpha``): one in-place SiLU pass instead of three;
* the key bias dropped — every score of a query row gains the same ``q·b_k``, and softmax is invariant to that —
  and the value bias moved into the output projection's bias (attention weights sum to one):
  ``Σ_j p_ij (v_j + b_v) = Σ_j p_ij v_j + b_v``, so ``b_o' = b_o + W_o b_v``;
* one set of activation buffers per batch, reused by every layer.

The result equals ``model.get_image_features`` up to float32 rounding (tests compare the two on random weights,
ViT-B/16 and stand-in shapes, ``quick_gelu`` and ``gelu``). GPUs and bfloat16 keep transformers' forward, whose
fused cuBLAS epilogues and autocast already serve them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

QUICK_GELU_ALPHA = 1.702       # quick_gelu(h) = h·sigmoid(1.702·h) (OpenAI CLIP; transformers' QuickGELUActivation)
ACTIVATIONS = ("quick_gelu", "gelu")
NAME = "kplib-cpu-fp32-v1"     # recorded in the embedding cache namespace (ClipEncoder.fingerprint)


def unsupported_reason(hidden_act: str | None, device: torch.device | str, dtype: str) -> str | None:
    """Why this forward cannot serve an image tower with activation ``hidden_act`` on ``device`` in ``dtype``
    (None: it can)."""
    if torch.device(device).type != "cpu":
        return f"device {str(device)!r} is not the CPU (transformers' forward serves accelerators)"
    if dtype != "float32":
        return f"dtype {dtype!r}: this forward is float32 (bfloat16 runs transformers' forward under autocast)"
    if hidden_act not in ACTIVATIONS:
        return f"the vision tower's activation {hidden_act!r} is not one of {ACTIVATIONS}"
    return None


def check_structure(model) -> None:
    """Raise ``TypeError`` naming the missing part when ``model`` is not shaped like transformers' CLIP (a
    ``vision_model`` with embeddings, pre/post layer norms and encoder layers of q/k/v/out projections and an
    fc1/fc2 MLP, plus a ``visual_projection``)."""
    vm = getattr(model, "vision_model", None)
    need = ["embeddings", "pre_layrnorm", "post_layernorm", "encoder"]
    missing = ["vision_model"] if vm is None else [n for n in need if not hasattr(vm, n)]
    if not hasattr(model, "visual_projection"):
        missing.append("visual_projection")
    if not missing:
        for i, layer in enumerate(vm.encoder.layers):
            parts = ["layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]
            missing += [f"encoder.layers[{i}].{p}" for p in parts if _get(layer, p) is None]
    if missing:
        raise TypeError(f"{type(model).__name__} is not shaped like transformers' CLIPModel: it lacks "
                        f"{', '.join(missing[:4])}")


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


@torch.inference_mode()
def image_features(model, pixel_values: Tensor, hidden_act: str = "quick_gelu") -> Tensor:
    """(B, 3, H, W) float32 pixels → (B, e) projected image features, as ``model.get_image_features`` computes
    them (before normalisation). ``model``: a ``CLIPModel`` or ``CLIPVisionModelWithProjection`` in eval mode."""
    vm = model.vision_model
    x = vm.pre_layrnorm(vm.embeddings(pixel_values))
    B, T, d = x.shape
    M = B * T
    x = x.reshape(M, d).contiguous()             # the residual stream, updated in place
    layers = vm.encoder.layers
    width = layers[0].mlp.fc1.out_features
    q, k, v = (torch.empty(M, d, dtype=x.dtype) for _ in range(3))
    h = torch.empty(M, width, dtype=x.dtype)
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        heads = attn.num_heads
        y = F.layer_norm(x, (d,), layer.layer_norm1.weight, layer.layer_norm1.bias, layer.layer_norm1.eps)
        torch.addmm(attn.q_proj.bias, y, attn.q_proj.weight.t(), out=q)
        torch.mm(y, attn.k_proj.weight.t(), out=k)           # key bias: no effect on softmax (see module doc)
        torch.mm(y, attn.v_proj.weight.t(), out=v)           # value bias: moved into the output bias below
        split = (B, T, heads, d // heads)
        att = F.scaled_dot_product_attention(q.view(split).transpose(1, 2), k.view(split).transpose(1, 2),
                                             v.view(split).transpose(1, 2), scale=attn.scale)
        x.addmm_(att.transpose(1, 2).reshape(M, d), attn.out_proj.weight.t())
        x.add_(torch.addmv(attn.out_proj.bias, attn.out_proj.weight, attn.v_proj.bias))
        y = F.layer_norm(x, (d,), layer.layer_norm2.weight, layer.layer_norm2.bias, layer.layer_norm2.eps)
        if hidden_act == "quick_gelu":
            a = QUICK_GELU_ALPHA
            torch.addmm(mlp.fc1.bias, y, mlp.fc1.weight.t(), beta=a, alpha=a, out=h)   # α·fc1(y)
            F.silu(h, inplace=True)
            x.addmm_(h, mlp.fc2.weight.t(), alpha=1 / a)                            # fc2 without bias, ÷α
        elif hidden_act == "gelu":
            torch.addmm(mlp.fc1.bias, y, mlp.fc1.weight.t(), out=h)
            torch.ops.aten.gelu_(h)
            x.addmm_(h, mlp.fc2.weight.t())
        else:
            raise ValueError(f"unsupported activation {hidden_act!r}; supported: {ACTIVATIONS}")
        x.add_(mlp.fc2.bias)
    pooled = vm.post_layernorm(x.view(B, T, d)[:, 0])
    return model.visual_projection(pooled)
