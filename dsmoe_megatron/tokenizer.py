"""A UTF-8 byte-level tokenizer that needs no vocabulary file, plus its Hugging Face export, and
a Hugging Face tokenizer directory for preprocessing the text of an imported model.

Ids 0-255 are the raw bytes; the special tokens follow them. It exposes the attributes that
Megatron-core's GPTDataset and indexed-dataset code read from a tokenizer (``vocab_size``,
``eod``, ``pad``, ``unique_identifiers``...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

NUM_BYTES = 256
EOD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|bos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOD_TOKEN, BOS_TOKEN, PAD_TOKEN)


class ByteTokenizer:
    """Text <-> UTF-8 bytes; special tokens get the ids after the 256 bytes."""

    def __init__(self) -> None:
        self.special_token_ids = {tok: NUM_BYTES + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = NUM_BYTES + len(SPECIAL_TOKENS)
        self.eod = self.special_token_ids[EOD_TOKEN]
        self.eos = self.eod
        self.bos = self.special_token_ids[BOS_TOKEN]
        self.pad = self.special_token_ids[PAD_TOKEN]
        # Megatron hashes this into the names of its cached sample indices.
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": self.vocab_size}

    def tokenize(self, text: str) -> list[int]:
        """Byte ids of ``text``; never emits special tokens, even for their literal spelling."""
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Iterable[int]) -> str:
        """Inverse of :meth:`tokenize`; special tokens are dropped, broken UTF-8 is replaced."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < NUM_BYTES)
        return data.decode("utf-8", errors="replace")

    @property
    def vocab(self) -> dict[str, int]:
        return {**{chr(b): b for b in range(NUM_BYTES)}, **self.special_token_ids}

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: tok for tok, i in self.vocab.items()}

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, eod={self.eod})"


class HFTokenizer:
    """A Hugging Face tokenizer directory (``tokenizer.json`` and its config, as from-hf keeps
    them in ``SAVE/hf_source``), for text a model imported with its own tokenizer is to read:
    the ids of ``encode(text, add_special_tokens=False)``, documents ended by its eos token, as
    Megatron-LM's ``preprocess_data.py`` makes them. Needs the optional ``transformers``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        directory = os.fspath(directory)
        if not any(os.path.isfile(os.path.join(directory, name))
                   for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise ValueError(
                f"--tokenizer {directory} holds no Hugging Face tokenizer (tokenizer.json, "
                "tokenizer_config.json or tokenizer.model); pass the directory of the model's "
                "tokenizer files (from-hf keeps them in SAVE/hf_source)")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError("--tokenizer needs the optional 'transformers' package: "
                             "pip install 'dsmoe-megatron[hf]'") from None
        try:  # from-hf's hf_source holds the model's config.json without its remote code
            self._hf = AutoTokenizer.from_pretrained(directory, local_files_only=True,
                                                     trust_remote_code=False)
        except Exception as err:  # noqa: BLE001 - transformers and tokenizers raise many kinds
            raise ValueError(f"--tokenizer {directory}: transformers cannot load its tokenizer "
                             f"({type(err).__name__}: {err}); replace the files with a complete "
                             "copy") from None
        self.directory = directory
        self.vocab_size = len(self._hf)
        self.eod = self._hf.eos_token_id

    def tokenize(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.directory!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def _bytes_to_visible_chars() -> list[str]:
    """The byte -> printable character table of the `tokenizers` ByteLevel pre-tokenizer.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are moved
    in order to code points 256 and up.
    """
    visible = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, shifted = [], 0
    for b in range(NUM_BYTES):
        if b in visible:
            chars.append(chr(b))
        else:
            chars.append(chr(NUM_BYTES + shifted))
            shifted += 1
    return chars


def write_hf_tokenizer(directory: str | os.PathLike, tokenizer: ByteTokenizer | None = None,
                       model_max_length: int | None = None) -> str:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for ``AutoTokenizer``.

    The result encodes (with ``add_special_tokens=False``) to exactly the ids of
    ``ByteTokenizer.tokenize``. ``model_max_length``: the context length of the model the files
    go with (what ``truncation=True`` cuts to); None leaves it unlimited. Needs the optional
    ``tokenizers`` package. Returns the directory.
    """
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError as err:
        raise ImportError(
            "Writing Hugging Face tokenizer files needs the 'tokenizers' package: "
            "pip install 'dsmoe-megatron[hf]'"
        ) from err

    tokenizer = tokenizer or ByteTokenizer()
    # A merge-free BPE over the ByteLevel alphabet maps every byte to its own id.
    vocab = {char: b for b, char in enumerate(_bytes_to_visible_chars())}
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    by_id = sorted(tokenizer.special_token_ids.items(), key=lambda item: item[1])
    hf.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok, _ in by_id])
    for tok, expected_id in by_id:
        got_id = hf.token_to_id(tok)
        if got_id != expected_id:
            raise RuntimeError(f"special token {tok} got id {got_id}, not {expected_id}")

    os.makedirs(directory, exist_ok=True)
    hf.save(os.path.join(directory, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOD_TOKEN,
        "pad_token": PAD_TOKEN,
        "clean_up_tokenization_spaces": False,
        # A padded batch generates as each prompt alone (a decoder-only model continues the
        # last position), as with the released model's LlamaTokenizerFast.
        "padding_side": "left",
        # Like ByteTokenizer, spell out "<|endoftext|>" found in text as bytes.
        "split_special_tokens": True,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return str(directory)
