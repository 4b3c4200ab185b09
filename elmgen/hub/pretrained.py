"""Hub-style loading and saving. `from_pretrained` takes a run folder, a checkpoint folder or `hf:ORG/NAME`, a
Hugging Face repository (downloaded once into the hub's cache, through the optional `huggingface_hub`);
`save_pretrained` writes one self-contained folder to upload: a language model carries its tokenizer with it.
A local path never touches the network."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from elmgen import checkpoint
from elmgen.errors import ElmgenError
from elmgen.hub.runs import model_card_of
from elmgen.io import TMP_PREFIX, publish_folder
from elmgen.models import load_model, tokenizer_path
from elmgen.tokenizers import QUANTIZERS, load_tokenizer
from elmgen.vocab import Vocab

HUB = "hf:"
TOKENIZER = "tokenizer"  # the sub-folder of an exported language model that holds its tokenizer


def local_folder(path_or_repo_id: str | Path) -> Path:
    """The folder itself, or for `hf:ORG/NAME` the repository's snapshot (downloaded unless cached)."""
    text = str(path_or_repo_id)
    if not text.startswith(HUB):
        return Path(text)
    repo = text[len(HUB) :]
    try:
        import huggingface_hub
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:
        raise ElmgenError(f"{text} needs huggingface_hub: pip install 'elmgen[hub]', or pass a local folder") from None
    try:
        return Path(huggingface_hub.snapshot_download(repo))
    except (OSError, ValueError, EntryNotFoundError) as e:  # offline, unknown repository, bad id, no access
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ElmgenError(f"cannot fetch {repo} from the Hugging Face hub ({reason}); pass a local folder") from None


def from_pretrained(path_or_repo_id: str | Path, device="cpu", ema: bool = True):
    """A language model (Transformer) or a tokenizer (Autoencoder) and its checkpoint config, from a local folder
    or `hf:ORG/NAME`."""
    folder = local_folder(path_or_repo_id)
    kind = checkpoint.load_config(folder).get("kind")
    if kind == "lm":
        return load_model(folder, device, ema)
    if kind in QUANTIZERS:
        return load_tokenizer(folder, device)
    raise ElmgenError(f"{folder} holds a {kind!r} checkpoint; from_pretrained loads language models and tokenizers")


def load_generator(model: str | Path, tokenizer: str | Path | None = None, device="cpu", ema: bool = True):
    """A language model and the tokenizer its codes came from (or `tokenizer`), each a local folder or
    `hf:ORG/NAME`, checked to belong together: (model, its config, tokenizer, its config)."""
    lm, lm_meta = load_model(local_folder(model), device, ema)
    tok, tok_meta = load_tokenizer(local_folder(tokenizer or lm_meta["codes"]["tokenizer"]), device)
    check_compatible(lm_meta, tok_meta)
    return lm, lm_meta, tok, tok_meta


def check_compatible(lm_meta: dict, tokenizer_meta: dict) -> None:
    """The LM must have been trained on codes of exactly this tokenizer."""
    vocab = Vocab.parse(lm_meta["model"]["vocab"])
    lm_grid = lm_meta["model"]["grid_size"]
    tok_bits = tokenizer_meta["bits"]
    tok_grid = tokenizer_meta["grid"]
    if vocab.bits != tok_bits or lm_grid != tok_grid:
        raise ElmgenError(
            f"the LM predicts {vocab.bits}-bit codes (vocabulary {vocab}) on a {lm_grid}x{lm_grid} grid but the "
            f"tokenizer {tokenizer_meta['path']} makes {tok_bits}-bit codes on {tok_grid}x{tok_grid}; "
            f"pass the tokenizer the LM was trained with ({lm_meta['codes']['tokenizer']})"
        )
    if lm_meta["codes"]["tokenizer_fingerprint"] != tokenizer_meta["fingerprint"]:
        raise ElmgenError(
            f"the LM was trained on codes of tokenizer {lm_meta['codes']['tokenizer']} (weights "
            f"{lm_meta['codes']['tokenizer_fingerprint']}), not {tokenizer_meta['path']} "
            f"(weights {tokenizer_meta['fingerprint']}); pass the tokenizer the LM was trained with"
        )


def save_pretrained(run: str | Path, out: str | Path) -> Path:
    """`out`: model.safetensors (the EMA weights when the run kept them), config.json and README.md (a model
    card) of the run's checkpoint; for a language model its tokenizer the same way in `out`/tokenizer, which the
    config then names relatively. Written under a temporary name and renamed into place."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ElmgenError(f"{out} exists and is not an empty folder; pass a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=TMP_PREFIX))
    try:
        meta = checkpoint.load_config(run)
        if meta.get("kind") == "lm":
            tokenizer = tokenizer_path(run, meta)
            write_flat(tokenizer, checkpoint.load_config(tokenizer), tmp / TOKENIZER)
            codes = {k: v for k, v in meta["codes"].items() if k != "path"}  # the code folder stays behind
            codes.update(tokenizer=TOKENIZER, tokenizer_fingerprint=checkpoint.fingerprint(tmp / TOKENIZER))
            meta["codes"] = codes
        write_flat(run, meta, tmp)
        if out.exists():
            out.rmdir()
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_flat(run, meta: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    weights = checkpoint.load_state(run, ema=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / checkpoint.WEIGHTS)
    (folder / checkpoint.CONFIG).write_text(json.dumps(meta, indent=2))
    (folder / "README.md").write_text(model_card_of(run, meta))
