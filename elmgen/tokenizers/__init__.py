"""Images to grids of integer cell codes and back: the autoencoder, one file per quantizer (bae, vq, fsq),
and the training losses."""

from elmgen.tokenizers.autoencoder import Autoencoder, load_tokenizer, release_weights
from elmgen.tokenizers.bae import BinaryQuantizer, binarize
from elmgen.tokenizers.config import QUANTIZERS, TokenizerConfig, training_memory_gb
from elmgen.tokenizers.fsq import FiniteScalarQuantizer
from elmgen.tokenizers.losses import LossConfig
from elmgen.tokenizers.quantizer import Quantized, straight_through
from elmgen.tokenizers.vq import VectorQuantizer
