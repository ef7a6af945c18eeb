"""Words as SPEC 9 defines them: the lowercase `[a-z']+` runs of decoded text.

The one definition of a word, used by the metrics (`stabjax.metrics.text.words`) and by
the training word counts (`stabjax.data.dataset.text_words`), so that the top-K words
and the generated words can never be tokenized differently. It is a module of its own,
with no dependencies, so that `stabjax.data` can use it without importing
`stabjax.metrics` (and, through it, JAX).
"""

from __future__ import annotations

import re

WORD_RE = re.compile(r"[a-z']+")


def words(text: str) -> list[str]:
  """Lowercase `[a-z']+` runs of `text` (SPEC 9).

  Taken literally, so a lone apostrophe (a quotation mark) is a word of its own and
  letters outside a-z (digits, accented letters) split words.
  """
  return WORD_RE.findall(text.lower())
