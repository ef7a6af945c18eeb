"""Data for stabjax (SPEC section 8): synthetic language, local text, TFDS; tokenizers; pipeline.

    config = DataConfig(spec="text:corpus/*.txt", seq_len=128, vocab_size=2048)
    dataset = load_dataset(config)
    it = make_iterator(dataset, "train", global_batch_size=16, seed=0)
    batch = next(it)            # {'tokens': int32 [16, 128], 'mask': int32 [16, 128]}
    saved = it.state.to_dict()  # JSON; make_iterator(..., state=saved) resumes exactly

The TFDS builder for `text:` lives in `stabjax.data.text_builder` (imported on use, so
synthetic data never imports TFDS).
"""

from stabjax.data.dataset import Dataset, Split, load_dataset, neg_log_frequency, text_words
from stabjax.data.pipeline import BatchIterator, IteratorState, make_iterator
from stabjax.data.spec import DATA_KINDS, DataConfig, DataError, DataSpec, parse_data_spec
from stabjax.data.synthetic import (BOS_ID, EOS_ID, MASK_ID, PAD_ID, Empirical,
                                    SyntheticLanguage, empirical_distribution)
from stabjax.data.tokenizer import (PseudoWordTokenizer, SentencePieceTokenizer, Tokenizer,
                                    train_sentencepiece)

__all__ = [
    "BOS_ID", "EOS_ID", "MASK_ID", "PAD_ID", "DATA_KINDS",
    "BatchIterator", "DataConfig", "DataError", "DataSpec", "Dataset", "Empirical",
    "IteratorState", "PseudoWordTokenizer", "SentencePieceTokenizer", "Split",
    "SyntheticLanguage", "Tokenizer", "empirical_distribution", "load_dataset",
    "make_iterator", "neg_log_frequency", "parse_data_spec", "text_words",
    "train_sentencepiece",
]
