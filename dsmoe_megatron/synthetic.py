"""A synthetic many-domain language: deterministic from a seed, any size, with a known entropy.

    python -m dsmoe_megatron.synthetic --output-prefix data/synthetic --tokens 3000000

Small-scale MoE comparisons need more text than the shipped corpus (a model must never see a
token twice) and text in which experts have something to specialise in. Each document is
written in one of ``lexicons x grammars`` domains:

- a lexicon: its own consonants, and nouns, verbs and modifiers spelt with them; which verb a
  noun takes, which object a verb takes and which modifier a noun takes follow sparse
  word-to-word associations (the lexicon's "facts": ``successors`` favourites per word, mixed
  with a Zipfian choice over the whole class);
- a grammar: the order of subject, verb and object, modifiers before or after their noun, an
  article, a clause joiner, capitalisation and a sentence terminator;
- shared by every domain: the function words (articles, joiners), spelt with letters no lexicon
  uses, and the sentence frame - knowledge common to all domains.

The lexicons' facts hold in every grammar, so a domain is a combination of two specialisms.
The text determines every random choice that produced it (distinct letters per lexicon,
terminator per grammar, word classes per lexicon disjoint), so the generator's log-likelihood
of a document is exact: ``oracle_loss`` gives the lowest loss any model can reach, in nats per
token (byte or end-of-document), on the documents of a split.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import itertools
import json
import math
import os
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dsmoe_megatron.cli import quiet_warnings, quiet_when_run_as_main

quiet_when_run_as_main(__name__)

from dsmoe_megatron.tokenizer import ByteTokenizer  # noqa: E402

FUNCTION_CONSONANTS = "tlnrs"
LEXICON_CONSONANTS = "bcdfghjkmpqvwxzy"  # split between the lexicons
VOWELS = "aeiou"
TERMINATORS = ".!?;:"
CLASSES = ("noun", "verb", "modifier")
ORDERS = ("SVO", "SOV", "VSO", "VOS", "OSV", "OVS")


@dataclass(frozen=True)
class LanguageConfig:
    seed: int = 0
    lexicons: int = 4
    grammars: int = 4
    words_per_class: int = 64
    successors: int = 4
    """Favourite next words of each word (a verb's objects, a noun's verbs and modifiers)."""
    association: float = 0.75
    """Probability that a word comes from its predecessor's favourites (else from its class)."""
    zipf: float = 1.0
    """Exponent of the Zipfian word and favourite frequencies."""
    modifier_prob: float = 0.5
    mean_sentences: float = 8.0

    def check(self) -> None:
        max_lexicons = len(LEXICON_CONSONANTS) // 2  # at least 2 consonants each
        consonants = len(LEXICON_CONSONANTS) // min(max(1, self.lexicons), max_lexicons)
        # Distinct words a lexicon can spell (2-3 syllables of 3 vowels, maybe a final
        # consonant); its three classes take 3 x words_per_class of them, at most half.
        max_words = (9 * consonants**2 + 27 * consonants**3) * (1 + consonants) // 6
        problems = [
            (not 1 <= self.grammars <= len(TERMINATORS), f"grammars must be 1..{len(TERMINATORS)}"),
            (not 1 <= self.lexicons <= max_lexicons, f"lexicons must be 1..{max_lexicons}"),
            (not 1 <= self.words_per_class <= max_words,
             f"words_per_class must be 1..{max_words} with {self.lexicons} lexicon(s)"),
            (not 1 <= self.successors <= self.words_per_class,
             "successors must be between 1 and words_per_class"),
            (not 0 <= self.association <= 1, "association must be in [0, 1]"),
            (not 0 <= self.zipf < math.inf, "zipf must be >= 0 (0: uniform word frequencies)"),
            (not 0 <= self.modifier_prob < 1, "modifier_prob must be in [0, 1)"),
            (self.mean_sentences < 1, "mean_sentences must be >= 1"),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(f"synthetic language: {message}")


class Choice:
    """A discrete distribution that samples and scores its outcomes."""

    def __init__(self, items, weights):
        total = float(sum(weights))
        self.items = list(items)
        self.probs = [w / total for w in weights]
        self.cumulative = list(itertools.accumulate(self.probs))
        self.index = {item: i for i, item in enumerate(self.items)}

    def sample(self, rng: random.Random):
        i = bisect.bisect_left(self.cumulative, rng.random() * self.cumulative[-1])
        return self.items[min(i, len(self.items) - 1)]

    def prob(self, item) -> float:
        i = self.index.get(item)
        return 0.0 if i is None else self.probs[i]


def _zipf(n: int, exponent: float) -> list[float]:
    return [1.0 / (rank + 1) ** exponent for rank in range(n)]


def _spell(rng: random.Random, consonants: str, vowels: str, taken: set[str]) -> str:
    while True:
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
        if rng.random() < 0.3:
            word += rng.choice(consonants)
        if word not in taken:
            taken.add(word)
            return word


class Lexicon:
    def __init__(self, rng: random.Random, consonants: str, cfg: LanguageConfig):
        vowels = "".join(rng.sample(VOWELS, 3))
        taken: set[str] = set()
        n = cfg.words_per_class
        self.words = {c: [_spell(rng, consonants, vowels, taken) for _ in range(n)]
                      for c in CLASSES}
        self.unigram = {c: Choice(words, _zipf(n, cfg.zipf)) for c, words in self.words.items()}
        favourite = _zipf(cfg.successors, cfg.zipf)
        # word -> class -> its favourites of that class: nouns -> verbs and modifiers,
        # verbs -> objects (nouns).
        self.favourites = {
            (word, target): Choice(rng.sample(self.words[target], cfg.successors), favourite)
            for source, targets in (("noun", ("verb", "modifier")), ("verb", ("noun",)))
            for word in self.words[source] for target in targets
        }
        self.association = cfg.association

    def prob(self, word: str, cls: str, after: str | None) -> float:
        p = self.unigram[cls].prob(word)
        if after is None:
            return p
        return self.association * self.favourites[after, cls].prob(word) + (
            1 - self.association) * p

    def sample(self, rng: random.Random, cls: str, after: str | None) -> tuple[str, float]:
        """A word of ``cls`` following ``after`` (None: by frequency alone) and its -log p."""
        if after is not None and rng.random() < self.association:
            word = self.favourites[after, cls].sample(rng)
        else:
            word = self.unigram[cls].sample(rng)
        return word, -math.log(self.prob(word, cls, after))


@dataclass(frozen=True)
class Grammar:
    order: str
    modifier_first: bool
    article: str | None
    joiner: str
    terminator: str
    capitalise: bool
    more_clauses: float  # probability of one more clause in a sentence


def _grammars(rng: random.Random, cfg: LanguageConfig) -> list[Grammar]:
    taken: set[str] = set()
    function_words = [_spell(rng, FUNCTION_CONSONANTS, VOWELS, taken) for _ in range(6)]
    orders = rng.sample(ORDERS, min(cfg.grammars, len(ORDERS)))
    return [
        Grammar(order=orders[g % len(orders)], modifier_first=rng.random() < 0.5,
                article=rng.choice([None, *function_words[:3]]),
                joiner=rng.choice(function_words[3:]), terminator=TERMINATORS[g],
                capitalise=g % 2 == 0, more_clauses=rng.uniform(0.2, 0.6))
        for g in range(cfg.grammars)
    ]


class SyntheticLanguage:
    def __init__(self, cfg: LanguageConfig = LanguageConfig()):
        cfg.check()
        self.cfg = cfg
        rng = random.Random(f"dsmoe-synthetic-language-{cfg.seed}")
        share = len(LEXICON_CONSONANTS) // cfg.lexicons
        self.lexicons = [Lexicon(rng, LEXICON_CONSONANTS[i * share:(i + 1) * share], cfg)
                         for i in range(cfg.lexicons)]
        self.grammars = _grammars(rng, cfg)
        self.domains = [(lex, gram) for lex in range(cfg.lexicons) for gram in range(cfg.grammars)]

    def _noun_phrase(self, rng, lexicon: Lexicon, grammar: Grammar, noun: str):
        words, nll = [noun], 0.0
        has_modifier = rng.random() < self.cfg.modifier_prob
        nll -= math.log(self.cfg.modifier_prob if has_modifier else 1 - self.cfg.modifier_prob)
        if has_modifier:
            modifier, cost = lexicon.sample(rng, "modifier", after=noun)
            words.insert(0 if grammar.modifier_first else 1, modifier)
            nll += cost
        if grammar.article:
            words.insert(0, grammar.article)
        return words, nll

    def _clause(self, rng, lexicon: Lexicon, grammar: Grammar):
        subject, nll = lexicon.sample(rng, "noun", after=None)
        verb, cost = lexicon.sample(rng, "verb", after=subject)
        nll += cost
        obj, cost = lexicon.sample(rng, "noun", after=verb)
        nll += cost
        parts = {"V": [verb]}
        for role, noun in (("S", subject), ("O", obj)):
            parts[role], cost = self._noun_phrase(rng, lexicon, grammar, noun)
            nll += cost
        return [w for role in grammar.order for w in parts[role]], nll

    def _sentence(self, rng, lexicon: Lexicon, grammar: Grammar):
        words, nll = self._clause(rng, lexicon, grammar)
        while rng.random() < grammar.more_clauses:
            more, cost = self._clause(rng, lexicon, grammar)
            words += [grammar.joiner, *more]
            nll += cost - math.log(grammar.more_clauses)
        nll -= math.log(1 - grammar.more_clauses)
        text = " ".join(words)
        if grammar.capitalise:
            text = text[0].upper() + text[1:]
        return text + grammar.terminator, nll

    def document(self, rng: random.Random) -> tuple[str, int, float]:
        """(text, domain index, -log p(text)) of one document."""
        domain = rng.randrange(len(self.domains))
        lexicon, grammar = (self.lexicons[self.domains[domain][0]],
                            self.grammars[self.domains[domain][1]])
        nll = math.log(len(self.domains))
        stop = 1.0 / self.cfg.mean_sentences
        sentences = []
        while True:
            text, cost = self._sentence(rng, lexicon, grammar)
            sentences.append(text)
            nll += cost
            if rng.random() < stop:
                nll -= math.log(stop)
                return " ".join(sentences), domain, nll
            nll -= math.log(1 - stop)


def metadata_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.synthetic.json")


def write_corpus(output_prefix: str | os.PathLike, num_tokens: int,
                 cfg: LanguageConfig = LanguageConfig(), force: bool = False) -> str:
    """Generate documents until they hold ``num_tokens`` tokens (bytes + one end-of-document
    each), write ``<prefix>.bin/.idx`` and ``<prefix>.synthetic.json`` (the language, each
    document's domain, token count and -log p). Returns the prefix. An existing corpus at the
    prefix is replaced only with ``force``."""
    from dsmoe_megatron.data import check_output_prefix, preprocess

    if num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens} must be >= 1")
    # Before Path(), which drops the "/" of "data/" (a corpus written as ./data.bin).
    check_output_prefix(os.fspath(output_prefix), force)
    language = SyntheticLanguage(cfg)
    rng = random.Random(f"dsmoe-synthetic-documents-{cfg.seed}")
    docs = {"domain": [], "tokens": [], "nll": []}
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=prefix.parent) as tmp:
        jsonl = Path(tmp) / "documents.jsonl"
        with open(jsonl, "w", encoding="utf-8") as f:
            total = 0
            while total < num_tokens:
                text, domain, nll = language.document(rng)
                f.write(json.dumps({"text": text}) + "\n")
                tokens = len(text.encode("utf-8")) + 1
                total += tokens
                for key, value in (("domain", domain), ("tokens", tokens), ("nll", nll)):
                    docs[key].append(value)
        preprocess([jsonl], prefix, ByteTokenizer(), force=force)
    meta = {"language": dataclasses.asdict(cfg), "num_tokens": sum(docs["tokens"]),
            "entropy_nats_per_token": sum(docs["nll"]) / sum(docs["tokens"]),
            "domains": [{"lexicon": lex, "grammar": gram} for lex, gram in language.domains],
            "grammars": [dataclasses.asdict(g) for g in language.grammars], "documents": docs}
    tmp_meta = metadata_path(prefix).with_suffix(".tmp")
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, metadata_path(prefix))
    return os.fspath(prefix)


def split_documents(num_documents: int, split: str) -> dict[str, range]:
    """The documents Megatron's GPTDataset assigns to train / valid / test for ``split``."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    out = {}
    for name, bookends in zip(("train", "valid", "test"), matrix):
        if bookends is not None:
            begin, end = (int(round(b * num_documents)) for b in bookends)
            out[name] = range(begin, end)
    return out


def split_stats(prefix: str | os.PathLike, split: str) -> dict[str, dict]:
    """Per split: documents, tokens and the generator's loss (nats per token) on them."""
    docs = json.loads(metadata_path(prefix).read_text())["documents"]
    out = {}
    for name, ids in split_documents(len(docs["tokens"]), split).items():
        tokens = sum(docs["tokens"][i] for i in ids)
        out[name] = {"documents": len(ids), "tokens": tokens,
                     "oracle_loss": sum(docs["nll"][i] for i in ids) / max(tokens, 1)}
    return out


def _language_dest(prefix: str, name: str) -> str:
    return f"{prefix.replace('-', '_')}{name}"


LANGUAGE_HELP = {
    "seed": "seed of the language and its documents",
    "lexicons": "vocabularies, each spelt with its own consonants "
                f"(1..{len(LEXICON_CONSONANTS) // 2})",
    "grammars": f"word orders and punctuation styles (1..{len(TERMINATORS)})",
    "words_per_class": "nouns, verbs and modifiers of each lexicon",
    "successors": "favourite next words of each word (1..words per class)",
    "association": "probability that a word is one of its predecessor's favourites, in [0, 1]",
    "zipf": "exponent of the Zipfian word frequencies, >= 0 (0: uniform)",
    "modifier_prob": "probability that a noun has a modifier, in [0, 1)",
    "mean_sentences": "mean sentences per document, >= 1",
}


def add_language_arguments(parser, prefix: str = "",
                           defaults: LanguageConfig = LanguageConfig()) -> None:
    """One option per LanguageConfig field on ``parser`` (or an argument group):
    ``--{prefix}words-per-class`` and so on."""
    for field in dataclasses.fields(LanguageConfig):
        parser.add_argument(f"--{prefix}{field.name.replace('_', '-')}",
                            dest=_language_dest(prefix, field.name),
                            type=type(field.default), default=getattr(defaults, field.name),
                            help=f"{LANGUAGE_HELP[field.name]} (default %(default)s)")


def language_from_args(args: argparse.Namespace, prefix: str = "") -> LanguageConfig:
    """The LanguageConfig that add_language_arguments(parser, prefix) parsed into ``args``."""
    return LanguageConfig(**{f.name: getattr(args, _language_dest(prefix, f.name))
                             for f in dataclasses.fields(LanguageConfig)})


def _token_count(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 1 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number >= 1 (e.g. 3e6), got {text!r}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsmoe_megatron.synthetic",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="write PREFIX.bin / .idx and PREFIX.synthetic.json")
    parser.add_argument("--tokens", type=_token_count, default=3e6,
                        help="corpus size in tokens (default %(default)g)")
    parser.add_argument("--force", action="store_true", help="replace an existing corpus at PREFIX")
    add_language_arguments(parser)
    args = parser.parse_args(quiet_warnings(argv))
    cfg = language_from_args(args)
    try:
        prefix = write_corpus(args.output_prefix, int(args.tokens), cfg, force=args.force)
    except (OSError, ValueError) as err:
        print(f"dsmoe_megatron.synthetic: {err}", file=sys.stderr)
        return 1
    meta = json.loads(metadata_path(prefix).read_text())
    print(f"wrote {prefix}.bin/.idx: {len(meta['documents']['tokens'])} documents, "
          f"{meta['num_tokens']} tokens, entropy {meta['entropy_nats_per_token']:.4f} nats/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
