"""Training: the shared loop (with every distributed helper in `distributed`) and one trainer per model:
tokenizer, language model, classifier."""

from elmgen.train.classifier import ClassifierJob, train_classifier
from elmgen.train.config import TrainConfig
from elmgen.train.lm import LOSSES, LMJob, ar_loss, mlm_loss, train_lm
from elmgen.train.loop import EMA, batch_indices, fit, make_optimizer, prepare
from elmgen.train.tokenizer import TokenizerJob, TokenizerTraining, tokenizer_step, train_tokenizer
