"""From a trained LM to images: sampling options and rules, AR decoding (prefill, then one cached step per
cell), MaskGIT, in- and outpainting, sample files."""

from elmgen.sampling.ar import OnStep, decode_one, generate_ar, prefill
from elmgen.sampling.config import SampleConfig
from elmgen.sampling.editing import (
    grey_cells,
    inpaint_images,
    outpaint_ar,
    outpaint_grid,
    outpaint_images,
    rectangle_hole,
    window_starts,
)
from elmgen.sampling.generate import (
    SHARD_FILE,
    check_classes,
    class_balanced,
    decode_images,
    generate,
    image_seeds,
    sample_images,
    shard_name,
    share,
    write_samples,
)
from elmgen.sampling.maskgit import generate_mlm
from elmgen.sampling.rules import (
    apply_guidance,
    draw_from,
    sample_logits,
    shape_logits,
    top_k_filter,
    top_p_filter,
)
