"""The networks: the image-token transformer (AR and MLM) with its KV cache, its sizes and their costs, and
the small CNN classifier that measures samples."""

from elmgen.models.classifier import Classifier, ClassifierConfig, load_classifier
from elmgen.models.cost import count_params, flops_per_token, sampling_cost, training_memory_gb
from elmgen.models.kv_cache import KVCache
from elmgen.models.presets import PRESETS, preset
from elmgen.models.transformer import (
    Attention,
    ModelConfig,
    Transformer,
    apply_rope,
    load_model,
    sequence_positions,
    tokenizer_path,
)
