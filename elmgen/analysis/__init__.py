"""The paper's analyses as numbers: how random image tokens are next to text, where a model's attention
looks, and how far the training loss falls and what the factorized vocabulary gives up (`elmgen analyze`)."""

from elmgen.analysis.attention import (
    AttentionConfig,
    analyze_attention,
    attention_metrics,
    capture_attention,
    model_input,
    sequence_heatmaps,
    uniform_attention,
)
from elmgen.analysis.bits import BitsConfig, analyze_bits, bit_cross_entropy, flip_costs, lm_bit_losses
from elmgen.analysis.loss import analyze_loss, run_losses
from elmgen.analysis.randomness import (
    analyze_randomness,
    bpe_tokens,
    code_streams,
    conditional_entropy,
    joint_entropy,
    randomness_markdown,
    token_statistics,
)
from elmgen.analysis.subcodes import SubcodesConfig, analyze_subcodes, factorization_gap
