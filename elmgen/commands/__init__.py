"""The commands of `elmgen`: one config dataclass and one function each (`elmgen.cli` makes the parser).

A command's dataclass is all it reads: `--config FILE` and `key=value` overrides set its fields (dotted keys, as
in sweep files: `elmgen sample sample.guidance_scale=3`), and its options are short ways to the most used keys.
Field comments are the help.
"""

from elmgen.commands import hub, measure, runs, sample, serve, tokens, train
from elmgen.commands.base import Command, Option
from elmgen.commands.hub import IMPORT_HELP
from elmgen.commands.measure import ANALYZE_HELP

GROUPS = {"analyze": ("ANALYSIS", ANALYZE_HELP), "import": ("SOURCE", IMPORT_HELP)}  # metavar and help of a group

COMMANDS = (
    *train.COMMANDS[:1],
    *tokens.COMMANDS,
    *train.COMMANDS[1:],
    *sample.COMMANDS,
    *runs.COMMANDS,
    *measure.COMMANDS,
    *serve.COMMANDS,
    *hub.COMMANDS,
)
