"""The three quantizers behind one interface, and the tokenizer commands on colour photographs."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from elmgen.cli import main
from elmgen.data import DataConfig, load_dataset, to_float
from elmgen.errors import ElmgenError
from elmgen.evaluation import psnr
from elmgen.tokenizers import (
    Autoencoder,
    FiniteScalarQuantizer,
    LossConfig,
    TokenizerConfig,
    VectorQuantizer,
    load_tokenizer,
)
from elmgen.train import TokenizerJob, TokenizerTraining, tokenizer_step

TINY = dict(base_width=16, channel_mult=[1, 2], num_res_blocks=1, latent_dim=16)


def test_code_bits_follow_the_code_space():
    assert TokenizerConfig(quantizer="vq", codebook_size=1024).code_bits == 10
    assert TokenizerConfig(quantizer="vq", codebook_size=1000).code_bits == 10
    assert TokenizerConfig(quantizer="vq", codebook_size=65536).code_bits == 16
    assert TokenizerConfig(quantizer="vq", codebook_size=65537).code_bits == 17
    fsq = TokenizerConfig(quantizer="fsq", fsq_levels=[8, 5, 5, 5])
    assert (fsq.num_codes, fsq.code_bits) == (1000, 10)
    assert TokenizerConfig(num_bits=12).code_bits == 12
    vq = Autoencoder(TokenizerConfig(**TINY, quantizer="vq", codebook_size=1000))
    assert str(vq.default_vocab) == "1-10"  # codebook indices are not bit fields
    assert str(Autoencoder(TokenizerConfig(**TINY, num_bits=12)).default_vocab) == "2-6"


def test_vq_picks_the_most_similar_code_in_chunks():
    cfg = TokenizerConfig(**TINY, quantizer="vq", codebook_size=70000, code_dim=4)  # 2^22 / 70000 = 59 rows a chunk
    vq = VectorQuantizer(cfg)
    u = F.normalize(torch.randn(3, 4, 6, 6), dim=1)  # 108 rows: two chunks
    codes = F.normalize(vq.codebook.weight, dim=1)
    brute = (u.flatten(2).transpose(1, 2) @ codes.T).argmax(-1)
    assert torch.equal(vq._nearest(u), brute)


def test_vq_loss_and_straight_through():
    cfg = TokenizerConfig(latent_dim=2, quantizer="vq", codebook_size=2, code_dim=2, commit_weight=0.25)
    vq = VectorQuantizer(cfg)
    with torch.no_grad():
        vq.proj_in.weight.copy_(torch.eye(2)[..., None, None])
        vq.proj_in.bias.zero_()
        vq.codebook.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))  # unit codes (1, 0) and (0, 1)
    z = torch.tensor([[0.6, 0.8], [-0.8, 0.6]]).T.reshape(1, 2, 1, 2).requires_grad_()  # already unit length
    q = vq(z)
    assert q.cells_BL.tolist() == [[1, 1]]  # (0.6, 0.8) and (-0.8, 0.6) are both nearest to (0, 1)
    mse = ((0.6**2 + 0.2**2) + (0.8**2 + 0.4**2)) / 4
    assert q.loss.item() == pytest.approx(1.25 * mse)
    q.z_BChw.sum().backward()
    assert z.grad.abs().sum() > 0  # straight through to the latents


def test_fsq_digits_and_lookup_agree():
    fsq = FiniteScalarQuantizer(TokenizerConfig(latent_dim=3, quantizer="fsq", fsq_levels=[3, 4]))
    with torch.no_grad():
        fsq.proj_in.weight.zero_()
        fsq.proj_in.bias.copy_(torch.tensor([10.0, -10.0]))  # channel 0 saturates high, channel 1 low
    z = torch.zeros(1, 3, 2, 2)
    q = fsq(z)
    assert q.cells_BL.tolist() == [[2 * 4 + 0] * 4]  # digits (2, 0), first channel most significant
    all_codes = torch.arange(12)[None]
    digits = all_codes[:, None] // fsq.radix % fsq.levels[..., 0]
    assert digits[0].T.tolist() == [[a, b] for a in range(3) for b in range(4)]
    assert torch.allclose(fsq.lookup(q.cells_BL, 2, 2), q.z_BChw)


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_codes_outside_the_code_space_are_refused(quantizer):
    model = Autoencoder(TokenizerConfig(**TINY, quantizer=quantizer, codebook_size=1000))
    with pytest.raises(ElmgenError, match=r"must lie in \[0, 1000\)"):
        model.decode_cells(torch.full((1, 4), 1000), 2)


def test_bernoulli_draws_of_the_binary_autoencoder():
    model = Autoencoder(TokenizerConfig(**TINY, num_bits=8)).eval()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        half = torch.full((2, 1, 8, 8, 8), 0.5)
        assert torch.equal(model.draw_cells(x, half)[:, 0], model.encode_cells(x))
        probs = model.quantizer.probs(model.encoder(x))
        draws = model.draw_cells(x, torch.rand(2, 400, 8, 8, 8))  # (B, D, L)
    bits = (draws[..., None] >> torch.arange(7, -1, -1)) & 1  # (B, D, L, K), first bit most significant
    assert torch.allclose(bits.float().mean(1), probs.flatten(2).transpose(1, 2), atol=0.1)
    with pytest.raises(ElmgenError, match="binary autoencoder"):
        Autoencoder(TokenizerConfig(**TINY, quantizer="vq")).draw_cells(x, half)


# Colour: random crops of the photographs scikit-image ships.
PHOTOS = ("astronaut", "coffee", "chelsea")


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """One class per photograph, 8 random crops of 40-120 px each (saved as PNG and JPEG)."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in PHOTOS:
        photo = getattr(data, name)()
        (root / name).mkdir()
        for i in range(8):
            side = int(rng.integers(40, 121))
            top, left = (int(rng.integers(0, s - side)) for s in photo.shape[:2])
            crop = Image.fromarray(photo[top : top + side, left : left + side])
            crop.save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


TINY_ARGS = [
    "tokenizer.base_width=16",
    "tokenizer.channel_mult=[1,2,2]",
    "tokenizer.latent_dim=16",
    "train.batch_size=8",
    "train.log_every=5",
    "eval_images=8",
]


@pytest.mark.parametrize(
    "quantizer,extra",
    [
        ("bae", ["tokenizer.num_bits=10"]),
        ("vq", ["tokenizer.codebook_size=64"]),
        ("fsq", ["tokenizer.fsq_levels=[4,4,4]"]),
    ],
)
@pytest.mark.slow
def test_train_eval_tokenize_on_colour_photos(photo_folder, tmp_path, capsys, quantizer, extra):
    tok = tmp_path / "tok"
    out = run(
        capsys,
        "train-tokenizer",
        "--out",
        tok,
        "--data",
        photo_folder,
        "data.channels=3",
        "data.image_size=32",
        f"tokenizer.quantizer={quantizer}",
        *extra,
        *TINY_ARGS,
        "train.steps=4",
    )
    report = json.loads(out)
    assert report["quantizer"] == quantizer and report["grid"] == [8, 8] and -1 <= report["ssim"] <= 1
    model, meta = load_tokenizer(tok)
    assert (meta["kind"], meta["channels"], model.cfg.in_channels) == (quantizer, 3, 3)
    ev = tmp_path / "eval"
    report = json.loads(run(capsys, "eval-tokenizer", "--tokenizer", tok, "--out", ev, "--split", "train"))
    assert report["images"] == 21 and (ev / "eval.json").is_file()  # one crop of each photo is held out
    assert Image.open(ev / "reconstructions.png").mode == "RGB"
    codes = json.loads(
        run(
            capsys,
            "tokenize",
            "--tokenizer",
            tok,
            "--out",
            tmp_path / "codes",
            "--crops",
            "five",
            "--crop-range",
            "1.25",
            "--flip",
        )
    )
    assert codes["count"] == 21 * 10 and codes["vocab"] == ("2-5" if quantizer == "bae" else f"1-{meta['bits']}")


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", ["bae", "vq", "fsq"])
def test_each_quantizer_learns_colour_photos(photo_folder, quantizer):
    """40 steps of the training objective on 24 crops must clearly beat the untrained reconstruction."""
    x = to_float(
        load_dataset(DataConfig(source=str(photo_folder), channels=3, image_size=16, holdout=0.0)).images(range(24))
    )
    cfg = TokenizerConfig(
        **TINY, in_channels=3, quantizer=quantizer, num_bits=12, codebook_size=256, fsq_levels=[5, 5, 5]
    )
    trainer = TokenizerTraining(TokenizerJob(tokenizer=cfg))
    model = trainer.tokenizer
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def reconstruction_psnr():
        with torch.no_grad():
            return psnr(model.eval().decode_cells(model.encode_cells(x), 8), x).mean().item()

    initial = reconstruction_psnr()
    model.train()
    for step in range(40):
        loss, _, _ = tokenizer_step(trainer, x, step, LossConfig(), None)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert reconstruction_psnr() > initial + 3
