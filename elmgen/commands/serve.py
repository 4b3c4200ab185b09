"""`elmgen serve`: a browser demo over trained LM runs (gradio: the optional extra elmgen[demo])."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from elmgen.commands.base import POSITIVE, Command, Option, named
from elmgen.commands.sample import LMOptions, load_lm
from elmgen.sampling import SampleConfig
from elmgen.serve import Run, serve
from elmgen.serve.app import import_gradio


@dataclass
class ServeCommand:
    model: list[str] = MISSING  # LM run folders or checkpoints to offer (--model A --model B)
    tokenizer: str | None = None  # tokenizer run folder (default: the one each LM's codes came from)
    ema: bool = True  # use the EMA weights when the checkpoint kept them (false: the trained ones)
    device: str = "auto"  # auto, cpu, cuda[:N] or mps
    host: str = "127.0.0.1"  # address to listen on (0.0.0.0 shows the page to the network)
    port: int = field(default=7860, metadata=POSITIVE)  # port to listen on
    sample: SampleConfig = field(default_factory=SampleConfig)  # the page's starting sampling options


def serve_command(cmd: ServeCommand) -> None:
    import_gradio()  # a missing gradio is one line, before any model is loaded
    runs = []
    for path in cmd.model:
        lm = LMOptions(model=path, tokenizer=cmd.tokenizer, ema=cmd.ema, device=cmd.device, out="", sample=cmd.sample)
        model, tokenizer, tok_meta = load_lm(lm)
        runs.append(Run(path, model, tokenizer, tok_meta))
    extra = (*(("--tokenizer", cmd.tokenizer) if cmd.tokenizer else ()), *(() if cmd.ema else ("--no-ema",)))
    serve(runs, cmd.sample, cmd.host, cmd.port, extra)


COMMANDS = (
    Command(
        "serve",
        ServeCommand,
        serve_command,
        "a browser demo over trained LM runs",
        "Start a Gradio page (pip install elmgen[demo]) that samples the given LM runs as `elmgen sample` does: "
        "model, class, seed, guidance, temperature, top-k/p, MaskGIT steps; the images fill in as they are "
        "decoded, then the grid, the per-image seeds and the equivalent command, with samples.png and samples.npz. "
        "Edit: MLM inpainting of the cells painted with the mouse, AR outpainting. Inspect: the attention from a "
        "cell, the tokenizer's reconstruction and codes. Listens on 127.0.0.1 by default.",
        (
            Option(("--model",), "model", action="append"),
            *named("tokenizer", "device", "host", "port"),
            Option(("--no-ema",), "ema", const=False),
        ),
    ),
)
