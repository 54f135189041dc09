"""Build a small, deterministic Megatron mmap dataset for ``--tokenizer-type NullTokenizer --vocab-size 256``.

Usage: python megatron_data.py MEGATRON_TREE OUTPUT_PREFIX  (writes OUTPUT_PREFIX_text_document.{bin,idx})

The documents are the help topics of Python's ``pydoc_data.topics`` (sorted by key), as UTF-8 bytes. Megatron's
NullTokenizer reads "b0 b1 ..." as the token ids [b0, b1, ...] and its end-of-document id is 256, appended to
each document as ``tools/preprocess_data.py --append-eod`` does.
"""

import sys

import torch
from pydoc_data.topics import topics


def main(tree: str, prefix: str) -> None:
    sys.path.insert(0, tree)
    from megatron.data import indexed_dataset
    from megatron.tokenizer.tokenizer import _NullTokenizer

    tokenizer = _NullTokenizer(256)
    out = prefix + "_text_document"
    builder = indexed_dataset.make_builder(out + ".bin", impl="mmap", vocab_size=tokenizer.vocab_size)
    for key in sorted(topics):
        ids = tokenizer.tokenize(" ".join(str(b) for b in topics[key].encode("utf-8"))) + [tokenizer.eod]
        builder.add_item(torch.tensor(ids, dtype=torch.int64))
        builder.end_document()
    builder.finalize(out + ".idx")


if __name__ == "__main__":
    main(*sys.argv[1:3])
