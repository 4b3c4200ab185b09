"""Model sizes by name: the one place they are defined (configs and the command line refer to them)."""

from __future__ import annotations

from elmgen.errors import ElmgenError

# Sizes: small ones for CPU runs, then the paper's (head dim 64) and LlamaGen's 3B (head dim 100).
PRESETS: dict[str, dict] = {
    "micro": dict(n_layer=2, d_model=64, n_head=2, dropout=0.0),
    "tiny": dict(n_layer=4, d_model=256, n_head=4, dropout=0.0),
    "small": dict(n_layer=8, d_model=384, n_head=6, dropout=0.0),
    "B": dict(n_layer=12, d_model=768, n_head=12, dropout=0.1),
    "L": dict(n_layer=24, d_model=1024, n_head=16, dropout=0.1),
    "XL": dict(n_layer=36, d_model=1280, n_head=20, dropout=0.1),
    "XXL": dict(n_layer=48, d_model=1536, n_head=24, dropout=0.1),
    "2B": dict(n_layer=48, d_model=1792, n_head=28, dropout=0.1),
    "3B": dict(n_layer=24, d_model=3200, n_head=32, dropout=0.1),
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ElmgenError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])
