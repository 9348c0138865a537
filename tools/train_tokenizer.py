"""Train a SentencePiece tokenizer on a corpus of the project's datasets.

  python tools/train_tokenizer.py --output=/path/tok.model --vocab_size=8192 \
      [--config=configs/default.py --config.data.name=text_files --config.data.files='*.txt']

Reads the train split of `data.name` (prepared as for training), writes `tok.model`; then
train with --config.data.tokenizer=/path/tok.model. Special ids (PAD, BOS, EOS, MASK, ...) are
added by the project around the pieces, so the model itself reserves none besides <unk>.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from mdlm_jax import cli  # noqa: E402
from mdlm_jax import distributed  # noqa: E402

_CONFIG = cli.define_config()
_OUTPUT = flags.DEFINE_string("output", None, "Path of the .model file to write.",
                              required=True)
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "Pieces, <unk> included.")
_MAX_DOCS = flags.DEFINE_integer("max_documents", 200000, "Documents sampled for training.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece model.")


def train(texts, output: str, vocab_size: int, model_type: str = "bpe") -> str:
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if not output.endswith(".model"):
    raise ValueError(f"--output={output!r} must end in .model")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_prefix=output[:-len(".model")],
      vocab_size=vocab_size, model_type=model_type, character_coverage=1.0,
      byte_fallback=True, split_by_whitespace=True, remove_extra_whitespaces=False,
      normalization_rule_name="identity", add_dummy_prefix=False, bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0,
      max_sentence_length=1 << 16, minloglevel=2)
  return output


def main(argv):
  del argv
  distributed.initialize()
  from mdlm_jax.data import builders  # pylint: disable=g-import-not-at-top
  source = builders.data_source(builders.load_builder(_CONFIG.value.data), "train")
  n = min(len(source), _MAX_DOCS.value)
  texts = (builders.text_of(source[i]).decode("utf-8", "replace") for i in range(n))
  path = train(texts, _OUTPUT.value, _VOCAB.value, _MODEL_TYPE.value)
  print(f"wrote {path} ({_VOCAB.value} pieces from {n} documents)")


if __name__ == "__main__":
  cli.run(main)
