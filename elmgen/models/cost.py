"""What a model size costs, computed from its config alone: parameters, FLOPs per token, training memory and
what sampling an image takes."""

from __future__ import annotations

import torch

from elmgen.models.transformer import ModelConfig, Transformer


def count_params(cfg: ModelConfig) -> int:
    """Parameter count without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: ModelConfig) -> dict:
    """Training and forward FLOPs per sequence position (multiply-add = 2 FLOPs).

    Matmuls: 2 x the matmul parameters (all but the embedding tables, which are lookups). Attention:
    scores and weighted values take 2 * 2 * T * d per layer at full context; causal AR attends to
    T/2 positions on average. Training = forward + backward = 3 x forward.
    """
    T, d, L = cfg.num_cells, cfg.d_model, cfg.n_layer
    per_layer = 4 * d * d + 3 * d * cfg.mlp_hidden
    n = cfg.vocabulary.num_subcodes
    matmul_params = L * per_layer + n * d * d + d * n * cfg.vocabulary.size  # blocks, input projection, heads
    attention = 4 * L * T * d // (2 if cfg.kind == "ar" else 1)
    forward = 2 * matmul_params + attention
    return {"matmul": 2 * matmul_params, "attention": attention, "forward": forward, "train": 3 * forward}


def sampling_cost(cfg: ModelConfig, guided: bool = True, bytes_per_value: int = 2) -> dict:
    """What sampling one image costs in bf16 (`bytes_per_value` 2; 4 for fp32): the weights every decode step
    reads, the forward FLOPs of all its positions (with guidance every row is doubled) and, for AR, the KV cache
    it holds at the end (keys and values of the class token and every cell, in every layer). An MLM's FLOPs are
    per MaskGIT step: each runs the whole grid."""
    rows, T = (2 if guided else 1), cfg.num_cells
    cost = {
        "weights_gb": round(count_params(cfg) * bytes_per_value / 1e9, 3),
        "gflop_per_image": round(rows * T * flops_per_token(cfg)["forward"] / 1e9, 1),
    }
    if cfg.kind == "ar":
        cost["kv_cache_mb_per_image"] = round(rows * 2 * cfg.n_layer * (1 + T) * cfg.d_model * bytes_per_value / 1e6, 1)
    return cost


def training_memory_gb(
    cfg: ModelConfig,
    batch_per_gpu: int,
    gpus: int = 1,
    sharded: bool = False,
    activation_checkpointing: bool = False,
    ema: bool = True,
) -> float:
    """Estimated peak memory per GPU (GB) of bf16-autocast AdamW training.

    States: fp32 weights, grads and two Adam moments = 16 B/param (+4 with fp32 EMA), divided by the
    number of GPUs when sharded (FSDP). Activations per layer and token, in bf16: 34 d + 5 h T bytes
    (Korthikanti et al. 2022) without checkpointing; 2 d bytes (the layer input) with it, plus one
    layer recomputed at a time.
    """
    params = count_params(cfg)
    states = params * (16 + 4 * ema) / (gpus if sharded else 1)
    T, d, h = cfg.num_cells, cfg.d_model, cfg.n_head
    per_layer_token = 34 * d + 5 * h * T
    tokens = batch_per_gpu * T
    if activation_checkpointing:
        activations = tokens * (cfg.n_layer * 2 * d + per_layer_token)
    else:
        activations = tokens * cfg.n_layer * per_layer_token
    logits = tokens * cfg.vocabulary.num_subcodes * cfg.vocabulary.size * (2 + 4 + 4)  # bf16 out, fp32 CE + grad
    return (states + activations + logits) / 1e9
