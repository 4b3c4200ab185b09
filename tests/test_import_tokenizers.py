"""Released tokenizers (ELM's BAE, LlamaGen's VQ) as elmgen tokenizers: state dicts built here in the official
layouts (their names and shapes, tiny sizes, random values) convert, load strictly and keep their codes."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from elmgen.checkpoint import CheckpointMeta, save_checkpoint
from elmgen.config import to_dict
from elmgen.errors import ElmgenError
from elmgen.hub.tokenizers import elm_bae, llamagen_vq, tokenizer_layout
from elmgen.tokenizers import Autoencoder, load_tokenizer
from elmgen.tokenizers.autoencoder import AttnBlock, Downsample
from elmgen.vocab import cells_to_bits


class Official:
    """A state dict in an official layout: random tensors under the official module names."""

    def __init__(self, seed: int = 0):
        self.t: dict[str, torch.Tensor] = {}
        self.g = torch.Generator().manual_seed(seed)

    def rand(self, *shape):
        return torch.randn(*shape, generator=self.g) / (shape[1] * shape[2] ** 2 if len(shape) == 4 else 1) ** 0.5

    def conv(self, p, cin, cout, k=3):
        self.t[f"{p}.weight"], self.t[f"{p}.bias"] = self.rand(cout, cin, k, k), 0.1 * self.rand(cout)

    def norm(self, p, c):
        self.t[f"{p}.weight"], self.t[f"{p}.bias"] = 1 + 0.2 * self.rand(c), 0.2 * self.rand(c)

    def res(self, p, cin, cout, shortcut):
        self.norm(f"{p}.norm1", cin), self.conv(f"{p}.conv1", cin, cout)
        self.norm(f"{p}.norm2", cout), self.conv(f"{p}.conv2", cout, cout)
        if shortcut == "conv_out" or (shortcut and cin != cout):  # ELM: always built; LlamaGen: when needed
            self.conv(f"{p}.{shortcut}", cin, cout, 1)

    def attn(self, p, c):
        self.norm(f"{p}.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            self.conv(f"{p}.{n}", c, c, 1)


def elm_state(nf=32, mult=(1, 2), blocks=1, emb=32, bits=8, norm_first=True, dec_blocks=None, prefix="ae."):
    """ELM's BinaryAutoEncoder as `binaryae.py` names it: `encoder.blocks.i`, `quantize.proj.0`, `quantize.embed`,
    `generator.blocks.i` (and the unused `generator.logsigma`); attention at the lowest resolution."""
    o, widths = Official(), [nf * m for m in mult]
    seq = []  # (kind, args) in forward order; numbered afterwards like ELM's ModuleList

    def level(cin, cout, n, lowest):
        for _ in range(n):
            seq.append(("res", cin, cout))
            cin = cout
            if lowest:
                seq.append(("attn", cout))

    seq.append(("conv", 3, widths[0]))
    cin = widths[0]
    for i, w in enumerate(widths):
        level(cin, w, blocks, i == len(widths) - 1)
        cin = w
        if i < len(widths) - 1:
            seq.append(("resample", w))
    seq += [("res", cin, cin), ("attn", cin), ("res", cin, cin), ("norm", cin), ("conv", cin, emb)]
    enc, seq = seq, []
    seq += [("norm", emb)] if norm_first else []
    seq += [("conv", emb, widths[-1]), ("res", cin, cin), ("attn", cin), ("res", cin, cin)]
    for i, w in enumerate(widths[::-1]):
        level(cin, w, dec_blocks or blocks, i == 0)
        cin = w
        if i < len(widths) - 1:
            seq.append(("resample", w))
    seq += [("norm", cin), ("conv", cin, 3)]
    for part, layers in (("encoder", enc), ("generator", seq)):
        for i, (kind, *args) in enumerate(layers):
            p = f"{part}.blocks.{i}"
            {"conv": o.conv, "norm": o.norm, "attn": o.attn}.get(kind, lambda p, *a: None)(p, *args)
            if kind == "res":
                o.res(p, *args, shortcut="conv_out")
            if kind == "resample":
                o.conv(f"{p}.conv", args[0], args[0])
    o.conv("quantize.proj.0", emb, bits, 1)
    o.t["quantize.embed.weight"] = o.rand(bits, emb)
    o.conv("generator.logsigma.0", cin, cin), o.conv("generator.logsigma.2", cin, 3, 1)
    state = {prefix + k: v for k, v in o.t.items()}
    if prefix:  # the training file keeps the discriminator beside the autoencoder
        state["disc.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    return state


def llamagen_state(ch=32, mult=(1, 2), blocks=1, z=32, codes=64, dim=8):
    """LlamaGen's VQModel as `vq_model.py` names it: `conv_blocks.l.res.j` / `.attn.j` (attention in the lowest
    level), `mid.0-2`, `norm_out`, `conv_out`, `quant_conv`, `quantize.embedding`, `post_quant_conv`."""
    o, widths = Official(1), [ch * m for m in mult]
    o.conv("encoder.conv_in", 3, widths[0])
    cin = widths[0]
    for i, w in enumerate(widths):
        for j in range(blocks):
            o.res(f"encoder.conv_blocks.{i}.res.{j}", cin, w, shortcut="nin_shortcut")
            cin = w
            if i == len(widths) - 1:
                o.attn(f"encoder.conv_blocks.{i}.attn.{j}", w)
        if i < len(widths) - 1:
            o.conv(f"encoder.conv_blocks.{i}.downsample.conv", w, w)
    o.conv("decoder.conv_in", z, cin)
    for part in ("encoder", "decoder"):
        o.res(f"{part}.mid.0", cin, cin, "nin_shortcut"), o.attn(f"{part}.mid.1", cin)
        o.res(f"{part}.mid.2", cin, cin, "nin_shortcut")
    o.norm("encoder.norm_out", cin), o.conv("encoder.conv_out", cin, z)
    for i, w in enumerate(widths[::-1]):
        for j in range(blocks + 1):
            o.res(f"decoder.conv_blocks.{i}.res.{j}", cin, w, shortcut="nin_shortcut")
            cin = w
            if i == 0:
                o.attn(f"decoder.conv_blocks.{i}.attn.{j}", w)
        if i < len(widths) - 1:
            o.conv(f"decoder.conv_blocks.{i}.upsample.conv", w, w)
    o.norm("decoder.norm_out", cin), o.conv("decoder.conv_out", cin, 3)
    o.conv("quant_conv", z, dim, 1), o.conv("post_quant_conv", dim, z, 1)
    o.t["quantize.embedding.weight"] = o.rand(codes, dim)
    o.t["quantize.codebook_used"] = torch.zeros(65536)
    return o.t


def images(n=2, side=16, seed=3):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def loaded(cfg, sd):
    model = Autoencoder(cfg).eval()
    model.load_state_dict(sd, strict=True)
    return model


@pytest.mark.parametrize("norm_first", [True, False])
def test_elm_bae_sizes_come_from_the_tensors(norm_first):
    state = elm_state(nf=32, mult=(1, 1, 2), blocks=2, emb=48, bits=12, norm_first=norm_first)
    cfg, sd = elm_bae(state, deterministic=not norm_first)
    assert (cfg.quantizer, cfg.num_bits, cfg.latent_dim, cfg.base_width) == ("bae", 12, 48, 32)
    assert (cfg.channel_mult, cfg.num_res_blocks, cfg.decoder_blocks) == ([1, 1, 2], 2, 2)
    assert cfg.decoder_in_norm == norm_first and cfg.level_attention and not cfg.out_silu and cfg.unit_pixels
    assert cfg.binarization == ("bernoulli" if norm_first else "deterministic")
    model = loaded(cfg, sd)
    with torch.no_grad():
        cells = model.encode_cells(images())
        assert cells.shape == (2, 16) and model.decode_cells(cells, 4).shape == (2, 3, 16, 16)


def test_elm_bits_decode_as_the_sum_of_their_embedding_rows():
    state = elm_state(prefix="")
    model = loaded(*elm_bae(state, deterministic=True))
    cells = torch.randint(0, 256, (2, 4))
    bits_BKhw = cells_to_bits(cells, 8, 2, 2)
    expected = torch.einsum("bkhw,kd->bdhw", bits_BKhw, state["quantize.embed.weight"])
    with torch.no_grad():
        assert torch.allclose(model.quantizer.lookup(cells, 2, 2), expected, atol=1e-6)


def test_unit_pixel_nets_keep_elmgens_images_in_minus_one_to_one():
    """ELM's nets read and write [0, 1]; the converted tokenizer takes and returns elmgen's [-1, 1] images."""
    cfg, sd = elm_bae(elm_state(), deterministic=True)
    plain = loaded(dataclasses.replace(cfg, unit_pixels=False), sd)
    x, cells = images(), torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        assert torch.equal(loaded(cfg, sd).encode_cells(x), plain.encode_cells((x + 1) / 2))
        assert torch.allclose(loaded(cfg, sd).decode_cells(cells, 8), plain.decode_cells(cells, 8) * 2 - 1)


def test_llamagen_vq_sizes_come_from_the_tensors_and_its_codebook_stays_l2_normalised():
    state = llamagen_state(ch=32, mult=(1, 2, 2), blocks=2, z=40, codes=96, dim=6)
    cfg, sd = llamagen_vq(state)
    assert (cfg.quantizer, cfg.codebook_size, cfg.code_dim, cfg.latent_dim) == ("vq", 96, 6, 40)
    assert (cfg.channel_mult, cfg.num_res_blocks, cfg.decoder_blocks) == ([1, 2, 2], 2, 3)
    assert cfg.out_silu and not cfg.decoder_in_norm and cfg.level_attention
    model = loaded(cfg, sd)
    cells = torch.tensor([[0, 5, 95, 7]])
    unit_codes = F.normalize(state["quantize.embedding.weight"][cells[0]], dim=1).T.reshape(1, 6, 2, 2)
    expected = F.conv2d(unit_codes, state["post_quant_conv.weight"], state["post_quant_conv.bias"])
    with torch.no_grad():
        assert torch.allclose(model.quantizer.lookup(cells, 2, 2), expected, atol=1e-6)
        assert model.encode_cells(images()).max() < 96


def test_official_attention_and_downsampling_compute_the_same_after_conversion():
    """The taming formulas (separate q, k, v convs; pad right and bottom, stride-2 conv) against the converted
    modules, on the encoder's middle attention and first downsampling."""
    state = llamagen_state()
    model = loaded(*llamagen_vq(state))
    attn, down = model.encoder.net[-4][1], model.encoder.net[2]  # [conv, res, down, res, attn, mid, ...]
    assert isinstance(attn, AttnBlock) and isinstance(down, Downsample)
    x = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(5))
    p = "encoder.mid.1"

    def conv(name, h):
        return F.conv2d(h, state[f"{p}.{name}.weight"], state[f"{p}.{name}.bias"])

    h = F.group_norm(x, 32, state[f"{p}.norm.weight"], state[f"{p}.norm.bias"], eps=1e-6)
    q, k, v = (conv(n, h).flatten(2) for n in "qkv")
    w_BLL = torch.softmax(q.transpose(1, 2) @ k / 64**0.5, dim=2)
    expected = x + conv("proj_out", (v @ w_BLL.transpose(1, 2)).view_as(x))
    y = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(6))
    d = "encoder.conv_blocks.0.downsample.conv"
    with torch.no_grad():
        assert torch.allclose(attn(x), expected, atol=1e-5)
        assert torch.allclose(down(y), F.conv2d(F.pad(y, (0, 1, 0, 1)), state[f"{d}.weight"], state[f"{d}.bias"], 2))


def test_tokenizer_layout_tells_the_two_releases_and_others_apart():
    assert tokenizer_layout(elm_state()) == tokenizer_layout(elm_state(prefix="")) == "elm_bae"
    assert tokenizer_layout(llamagen_state()) == "llamagen_vq"
    gpt = {"tok_embeddings.weight": torch.zeros(4, 2), "layers.0.attention.wqkv.weight": torch.zeros(6, 2)}
    assert tokenizer_layout(gpt) is None


def test_a_wrong_tensor_is_one_line_naming_it_and_the_expected_shape():
    state = elm_state()
    state["ae.generator.blocks.2.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(ElmgenError, match=r"generator\.blocks\.2\.conv2\.weight .*expected \(64, 64, 3, 3\)") as e:
        elm_bae(state, deterministic=False)
    assert "\n" not in str(e.value)
    state = llamagen_state()
    state["quantize.embedding.weight"] = torch.zeros(64, 8)
    state["post_quant_conv.weight"] = torch.zeros(32, 4, 1, 1)
    with pytest.raises(ElmgenError, match=r"post_quant_conv\.weight .*expected \(32, 8, 1, 1\)"):
        llamagen_vq(state)


def test_missing_and_unexpected_tensors_are_refused():
    state = llamagen_state()
    del state["decoder.mid.1.v.bias"]
    with pytest.raises(ElmgenError, match=r"decoder\.mid\.1\.v\.bias is missing"):
        llamagen_vq(state)
    state = llamagen_state()
    state["decoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(ElmgenError, match=r"decoder\.extra\.weight .*no place"):
        llamagen_vq(state)
    state = elm_state(blocks=2)  # encoder.blocks: conv, res, res, down, res, attn, res, attn, ...
    for k in [k for k in state if k.startswith("ae.encoder.blocks.5.")]:
        del state[k]
    state["ae.encoder.blocks.5.weight"] = torch.ones(64)  # a norm where the level's attention belongs
    with pytest.raises(ElmgenError, match=r"encoder\.blocks\.5 looks like a 'norm' module .* has 'attn'"):
        elm_bae(state, deterministic=True)


@pytest.mark.parametrize("layout", ["elm_bae", "llamagen_vq"])
def test_a_converted_tokenizer_round_trips_through_an_elmgen_checkpoint(tmp_path, layout):
    cfg, sd = elm_bae(elm_state(), deterministic=True) if layout == "elm_bae" else llamagen_vq(llamagen_state())
    model = loaded(cfg, sd)
    meta = CheckpointMeta(
        kind=cfg.quantizer, tokenizer=to_dict(cfg), bits=model.code_bits, num_codes=model.num_codes,
        image_size=16, channels=3, grid=16 // cfg.downsample,
    )  # fmt: skip
    save_checkpoint(tmp_path, 0, model, meta)
    again, _ = load_tokenizer(tmp_path)
    x = images()
    with torch.no_grad():
        cells = model.encode_cells(x)
        assert torch.equal(again.encode_cells(x), cells)
        assert torch.equal(again.decode_cells(cells, 8), model.decode_cells(cells, 8))
