"""Released checkpoint files read as data: `torch.load(weights_only=True)` only, so no pickle can run code.

The official files are `torch.save` pickles in a few layouts: a bare state dict (ELM's GPTs, LlamaGen's
FSDP-consolidated XXL and 3B), a training checkpoint holding it under "model" next to the optimizer and the
run's argparse arguments (LlamaGen's DDP-trained c2i GPTs and VQ), with DDP's `module.` or torch.compile's
`_orig_mod.` in front of the names.
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path

import torch

from elmgen.errors import ElmgenError

# The only class a released file may hold besides tensors and plain containers: LlamaGen's training checkpoints
# keep their command-line arguments, a bag of attributes that builds no code.
SAFE_GLOBALS = [argparse.Namespace]
WRAPPERS = ("model", "module", "state_dict")  # keys a training checkpoint keeps its weights under, first preferred
PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")  # DDP, torch.compile and FSDP name prefixes


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a released checkpoint file, unwrapped from the training checkpoint around them."""
    path = Path(path)
    if not path.is_file():
        raise ElmgenError(f"{path} is not a file; download the checkpoint first (docs/pretrained.md)")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            # mmap keeps a multi-GB file on disk until its tensors are copied; the legacy format cannot map
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        needs = re.search(r"GLOBAL (\S+)", str(e))
        what = f"the Python object {needs.group(1)}" if needs else "Python objects beyond tensors and containers"
        raise ElmgenError(f"{path} needs {what} to load and will not be unpickled (it could run code)") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        first = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
        raise ElmgenError(f"{path} is not a readable torch checkpoint ({first}); download it again") from None
    return unwrap(obj, path)


def unwrap(obj, path) -> dict[str, torch.Tensor]:
    """The state dict inside `obj`: itself when all its values are tensors, else the one under a WRAPPERS key."""
    while isinstance(obj, dict):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return {strip(k): v for k, v in obj.items()}
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    keys = sorted(map(str, obj))[:5] if isinstance(obj, dict) else type(obj).__name__
    raise ElmgenError(f"{path} holds no state dict of tensors (found {keys}); pass the checkpoint file itself")


def strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name
