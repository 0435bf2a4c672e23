"""A generated language task whose preference dispersion is known, prompt by prompt.

Four prompt families, from one right answer to many acceptable ones (word-level tokens, a fixed local
vocabulary; the world itself is drawn from a seed):

=============  ==========================================  ======================  ===============
family         prompt                                       candidate responses     true c = −log φ
=============  ==========================================  ======================  ===============
arithmetic     what is 3 plus 4                             the 8 numbers nearest   [2, 4]
                                                            the sum, by distance
lookup         capital of land07                            city07 and 7 others     [1, 2]
recommend      recommend a book about topic07               8 of 24 titles          [0.3, 1]
open           pick a colour for the thing07                2 shades × 4 of 8       [0.03, 0.3]
                                                            colours
=============  ==========================================  ======================  ===============

Every prompt x has K = 8 candidate responses (one or two words, then ``<eos>``), a central ranking of
them and its own dispersion c(x), log-uniform in its family's range. The centres share structure, so
that what is learnt on some prompts carries to others: arithmetic ranks by distance to the sum, lookup
puts the right city first and the others in a family-wide order, recommend and open rank their candidates
by a family-wide taste (one order of all titles, one of all shade–colour pairs). People are a
Mallows–Kendall model with that centre and φ(x) = exp(−c(x)):

- an answer someone gives (the SFT data) is the top choice of a ranking: rank j with probability
  φ^j / Σ_{i<K} φ^i;
- a preference between two candidates is the order a ranking puts them in: the one d places better
  in the centre wins with probability g_φ(d) = (d+1)/(1−φ^{d+1}) − d/(1−φ^d) (the exact pairwise
  marginal, ``mallows.pair_prob``), so label noise concentrates on high-dispersion prompts;
- the true reward of a response is its place on the rank scale, (K − 1 − rank)/(K − 1) ∈ [0, 1], and 0
  for anything outside the candidate set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import mallows

K = 8  # candidate responses per prompt
FAMILIES = ("arithmetic", "lookup", "recommend", "open")
C_RANGE = {"arithmetic": (2.0, 4.0), "lookup": (1.0, 2.0), "recommend": (0.3, 1.0), "open": (0.03, 0.3)}
N_ENTITIES = 48  # lands, topics and things: the most prompts a family other than arithmetic can have
N_TITLES = 24
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "pink", "grey")
SHADES = ("light", "dark")
PAD, EOS = "<pad>", "<eos>"


def _vocabulary() -> tuple[str, ...]:
    words = [PAD, EOS, "what", "is", "plus", "capital", "of", "recommend", "a", "book", "about", "pick",
             "colour", "for", "the"]
    words += [str(n) for n in range(19)]  # digits in prompts and sums as answers share their tokens
    words += [f"land{i:02d}" for i in range(N_ENTITIES)] + [f"city{i:02d}" for i in range(N_ENTITIES)]
    words += [f"topic{i:02d}" for i in range(N_ENTITIES)] + [f"title{i:02d}" for i in range(N_TITLES)]
    words += [f"thing{i:02d}" for i in range(N_ENTITIES)] + list(SHADES) + list(COLOURS)
    return tuple(words)


VOCAB = _vocabulary()
TOKEN = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, EOS_ID = TOKEN[PAD], TOKEN[EOS]


def encode(words: str | list[str]) -> list[int]:
    """Word-level tokenizer of this task: whitespace-split words to ids (a ValueError names an unknown word)."""
    out = []
    for w in words.split() if isinstance(words, str) else words:
        if w not in TOKEN:
            raise ValueError(f"encode: {w!r} is not a word of the task's vocabulary ({len(VOCAB)} words)")
        out.append(TOKEN[w])
    return out


def decode(ids: list[int] | np.ndarray) -> str:
    return " ".join(VOCAB[int(i)] for i in ids if int(i) != PAD_ID)


@dataclass
class World:
    """One seed's prompts. Arrays are indexed by prompt (P) and candidate (K)."""

    family: np.ndarray  # [P] int, index into FAMILIES
    prompt: list[list[int]]  # [P] token ids of each prompt
    candidates: list[list[list[int]]]  # [P][K] token ids of each response, <eos> included
    rank: np.ndarray  # [P, K] int, the candidate's place in the central ranking (0 = best)
    c: np.ndarray  # [P] true −log φ(x)
    heldout: np.ndarray  # [P] bool: no preference data on these prompts; evaluation only

    @property
    def phi(self) -> np.ndarray:
        return np.exp(-self.c)

    @property
    def reward(self) -> np.ndarray:
        """[P, K] true reward (K − 1 − rank)/(K − 1)."""
        return (K - 1 - self.rank) / (K - 1)

    def answer_probs(self) -> np.ndarray:
        """[P, K] the true answer distribution (the top choice of a Mallows ranking)."""
        by_rank = np.exp(mallows.choice_log_probs(K, self.phi))  # [P, K] over ranks
        return np.take_along_axis(by_rank, self.rank, axis=1)


def _arithmetic(rng: np.random.Generator, n: int):
    sums = rng.choice(100, size=n, replace=False)
    for code in sums:
        a, b = divmod(int(code), 10)
        s = a + b
        # Distance to the sum, ties (s − d vs s + d) broken by a coin per prompt.
        y = np.arange(19)
        order = np.argsort(2 * np.abs(y - s) + ((y < s) == (rng.random() < 0.5)), kind="stable")[:K]
        yield f"what is {a} plus {b}", [[str(v)] for v in order]


def _best_first(chosen: np.ndarray, taste: np.ndarray) -> list[int]:
    """``chosen`` items in the order of a family-wide taste (taste[i] = item i's place in it)."""
    return [int(i) for i in chosen[np.argsort(taste[chosen], kind="stable")]]


def _lookup(rng: np.random.Generator, n: int):
    taste = rng.permutation(N_ENTITIES)  # after the right one, better-known cities are preferred
    for i in rng.choice(N_ENTITIES, size=n, replace=False):
        others = rng.choice([j for j in range(N_ENTITIES) if j != i], size=K - 1, replace=False)
        yield f"capital of land{i:02d}", [[f"city{i:02d}"]] + [[f"city{j:02d}"] for j in _best_first(others, taste)]


def _recommend(rng: np.random.Generator, n: int):
    taste = rng.permutation(N_TITLES)  # one shared taste in books, whatever the topic
    for i in rng.choice(N_ENTITIES, size=n, replace=False):
        titles = _best_first(rng.choice(N_TITLES, size=K, replace=False), taste)
        yield f"recommend a book about topic{i:02d}", [[f"title{t:02d}"] for t in titles]


def _open(rng: np.random.Generator, n: int):
    combos = [[s, c] for s in SHADES for c in COLOURS]
    taste = rng.permutation(len(combos))  # one shared taste in colours, whatever the thing
    for i in rng.choice(N_ENTITIES, size=n, replace=False):
        colours = rng.choice(len(COLOURS), size=K // len(SHADES), replace=False)
        chosen = np.array([s * len(COLOURS) + c for s in range(len(SHADES)) for c in colours])
        yield f"pick a colour for the thing{i:02d}", [combos[j] for j in _best_first(chosen, taste)]


_MAKERS = {"arithmetic": _arithmetic, "lookup": _lookup, "recommend": _recommend, "open": _open}


def make_world(prompts_per_family: int, heldout_per_family: int, rng: np.random.Generator) -> World:
    """Draw the prompts, their centres (listed best first) and dispersions, and the held-out split."""
    if not 0 < heldout_per_family < prompts_per_family <= N_ENTITIES:
        raise ValueError(f"make_world: expected 0 < heldout_per_family ({heldout_per_family}) < "
                         f"prompts_per_family ({prompts_per_family}) <= {N_ENTITIES}")
    family, prompt, candidates, rank, c, heldout = [], [], [], [], [], []
    for f, name in enumerate(FAMILIES):
        lo, hi = C_RANGE[name]
        held = set(rng.choice(prompts_per_family, size=heldout_per_family, replace=False).tolist())
        for j, (text, best_first) in enumerate(_MAKERS[name](rng, prompts_per_family)):
            # Candidates are stored in a random order; rank[k] is candidate k's place in the centre.
            order = rng.permutation(K)
            family.append(f)
            prompt.append(encode(text))
            candidates.append([encode(best_first[i]) + [EOS_ID] for i in order])
            rank.append(order)
            c.append(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            heldout.append(j in held)
    return World(np.array(family), prompt, candidates, np.array(rank), np.array(c), np.array(heldout))


# ----------------------------------------------------------------------------------------------------
# Sequences


def pack(prompts: list[list[int]], responses: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids [N, T] of prompt + response and labels [N, T − 1] aligned with logits[:, :-1]:
    the next token at response positions, −100 elsewhere (prompt and padding)."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    ids = np.full((len(prompts), max(lengths)), PAD_ID, dtype=np.int64)
    labels = np.full((len(prompts), max(lengths) - 1), -100, dtype=np.int64)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :len(p) + len(r)] = p + r
        labels[i, len(p) - 1:len(p) + len(r) - 1] = r
    return ids, labels


def candidate_table(world: World, prompts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ids and labels of every candidate of ``prompts``, rows ordered prompt-major ([len(prompts)·K, T])."""
    return pack([world.prompt[p] for p in prompts for _ in range(K)],
                [world.candidates[p][k] for p in prompts for k in range(K)])


# ----------------------------------------------------------------------------------------------------
# Data


def sft_samples(world: World, per_prompt: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, candidate) indices of ``per_prompt`` answers per prompt drawn from the true distribution."""
    probs = world.answer_probs()
    p = np.repeat(np.arange(len(world.prompt)), per_prompt)
    cdf = np.cumsum(probs[p], axis=1)
    k = np.minimum((cdf <= rng.random((p.size, 1)) * cdf[:, -1:]).sum(axis=1), K - 1)
    return p, k


def preference_pairs(world: World, prompts: np.ndarray, per_prompt: int, sampler_probs: np.ndarray,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Pairs (x, winner, loser): two distinct candidates drawn from ``sampler_probs`` [P, K] (the
    reference's distribution over candidates), labelled by the prompt's Mallows model."""
    x = np.repeat(prompts, per_prompt)
    probs = sampler_probs[x].copy()
    a = _draw(probs, rng)
    probs[np.arange(x.size), a] = 0.0
    b = _draw(probs, rng)
    gap = world.rank[x, b] - world.rank[x, a]  # > 0: a is the better one in the centre
    p_better = mallows.pair_prob(np.abs(gap), world.phi[x])
    better_wins = rng.random(x.size) < p_better
    a_wins = np.where(gap > 0, better_wins, ~better_wins)
    return {"x": x, "w": np.where(a_wins, a, b), "l": np.where(a_wins, b, a)}


def _draw(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cdf = np.cumsum(probs, axis=1)
    return np.minimum((cdf <= rng.random((probs.shape[0], 1)) * cdf[:, -1:]).sum(axis=1), probs.shape[1] - 1)


def true_win_prob(world: World, prompts: np.ndarray) -> np.ndarray:
    """[len(prompts), K + 1, K + 1] P(response i beats response j) under the prompt's Mallows model;
    index K is "anything outside the candidate set", which loses to every candidate. Ties count ½."""
    rank = world.rank[prompts]
    gap = rank[:, None, :] - rank[:, :, None]  # [n, i, j] > 0 when i is better
    g = mallows.pair_prob(np.maximum(np.abs(gap), 1), world.phi[prompts][:, None, None])
    win = np.where(gap > 0, g, np.where(gap < 0, 1.0 - g, 0.5))
    out = np.full((len(prompts), K + 1, K + 1), 0.5)
    out[:, :K, :K] = win
    out[:, :K, K] = 1.0
    out[:, K, :K] = 0.0
    return out
