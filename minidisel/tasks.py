"""Synthetic two-distribution tasks: a pre-training distribution P and a fine-tuning distribution Q.

Every task shares one 16-token vocabulary and is generated on the fly, so
nothing is downloaded. Token ids:

    0-9  digits      10 BOS      11 SEP      12 REV      13 ADD      14-15 unused

Task families (the name given to ``--task``):

* ``disjoint``: P reverses a string of digits 0-4; Q reverses a string of digits
  5-9 and maps each digit d to (d + 1) mod 5, so Q's answers are digits 0-4,
  which the base model already writes. No marker token: only the input digits
  tell P from Q, and no input digit is shared.
* ``overlap-K`` (K = 0..5): as ``disjoint``, but Q draws its digits from
  ``5-K .. 9-K``, so K digits are shared with P. ``overlap-0`` is ``disjoint``.
* ``shared``: P reverses a string of digits 0-9 after a REV marker; Q adds 1
  to each digit (mod 10) after an ADD marker. P and Q use the same digits.
* ``markov``: next-token prediction on two random Markov chains over the digits
  (fixed transition matrices, drawn once from a Dirichlet with seed 1234).

A batch is ``{"inputs": (B, T) int, "targets": (B, T) int, "mask": (B, T) bool}``;
``mask`` marks the positions that are scored: the answer digits of sequence
tasks, every position of ``markov``.
"""

from dataclasses import dataclass
from functools import partial

import numpy as np

VOCAB_SIZE = 16
BOS, SEP, REV, ADD = 10, 11, 12, 13
STRING_LENGTH = 6
MARKOV_LENGTH = 24
MARKOV_SEED = 1234
DISTRIBUTIONS = ("P", "Q")


@dataclass(frozen=True)
class Task:
    """A named pair of distributions P and Q over one vocabulary.

    ``samplers[dist](rng, n)`` returns ``n`` token sequences of length
    ``seq_len``; ``scored`` marks the input positions whose targets count;
    ``has_answers`` is True when exact-match accuracy is meaningful.
    """

    name: str
    description: str
    samplers: dict
    seq_len: int
    scored: np.ndarray
    has_answers: bool
    vocab_size: int = VOCAB_SIZE


def operate(x, op):
    """Apply a digit-string operation to each row of ``x`` (N, L)."""
    if op == "reverse":
        return x[:, ::-1]
    if op == "reverse_add1_mod5":
        return (x[:, ::-1] + 1) % 5
    if op == "add1":
        return (x + 1) % 10
    raise ValueError(f"unknown digit operation {op!r}")


def digit_sequences(rng, n, digits, ops):
    """Return ``n`` sequences ``BOS [marker] x SEP op(x)``; ``ops`` maps a marker (or None) to an operation."""
    x = rng.choice(np.asarray(digits), size=(n, STRING_LENGTH))  # (N, L)
    markers = list(ops)
    choice = rng.integers(len(markers), size=n)
    rows = []
    for i in range(n):
        marker = markers[choice[i]]
        head = [BOS] if marker is None else [BOS, marker]
        rows.append(np.concatenate([head, x[i], [SEP], operate(x[i : i + 1], ops[marker])[0]]))
    return np.stack(rows).astype(np.int64)


def markov_chains():
    """Return the fixed transition matrices of the ``markov`` task's P and Q chains (10 x 10 each)."""
    rng = np.random.default_rng(MARKOV_SEED)
    return {dist: rng.dirichlet(np.full(10, 0.3), size=10) for dist in DISTRIBUTIONS}


def markov_sequences(rng, n, transitions):
    """Return ``n`` sequences ``BOS s_1 ... s_L`` of a Markov chain started uniformly."""
    states = np.empty((n, MARKOV_LENGTH), dtype=np.int64)
    states[:, 0] = rng.integers(10, size=n)
    cumulative = np.cumsum(transitions, axis=1)
    for t in range(1, MARKOV_LENGTH):
        u = rng.random(n)[:, None]
        states[:, t] = np.minimum((u > cumulative[states[:, t - 1]]).sum(axis=1), 9)
    return np.concatenate([np.full((n, 1), BOS), states], axis=1)


def answer_positions(seq_len):
    """Return the scored input positions of a sequence task: those whose target is an answer digit."""
    scored = np.zeros(seq_len - 1, dtype=bool)
    scored[seq_len - 1 - STRING_LENGTH :] = True
    return scored


def overlap_task(k):
    """Build the ``overlap-K`` task: K of Q's five input digits are shared with P."""
    if not 0 <= k <= 5:
        raise ValueError(f"overlap must be between 0 and 5 shared digits, got {k}")
    q_digits = list(range(5 - k, 10 - k))
    samplers = {
        "P": partial(digit_sequences, digits=list(range(5)), ops={None: "reverse"}),
        "Q": partial(digit_sequences, digits=q_digits, ops={None: "reverse_add1_mod5"}),
    }
    seq_len = 2 * STRING_LENGTH + 2
    name = "disjoint" if k == 0 else f"overlap-{k}"
    description = f"P: reverse digits 0-4; Q: reverse digits {q_digits[0]}-{q_digits[-1]}, then d -> (d + 1) mod 5"
    return Task(name, description, samplers, seq_len, answer_positions(seq_len), True)


def shared_task():
    """Build the ``shared`` task: reverse versus add-1, on the same digits, with marker tokens."""
    digits = list(range(10))
    samplers = {
        "P": partial(digit_sequences, digits=digits, ops={REV: "reverse"}),
        "Q": partial(digit_sequences, digits=digits, ops={ADD: "add1"}),
    }
    seq_len = 2 * STRING_LENGTH + 3
    description = "P: reverse digits 0-9 after a REV marker; Q: add 1 to each digit after an ADD marker"
    return Task("shared", description, samplers, seq_len, answer_positions(seq_len), True)


def markov_task():
    """Build the ``markov`` task: next-token prediction on two Markov chains over the same digits."""
    chains = markov_chains()
    samplers = {dist: partial(markov_sequences, transitions=chains[dist]) for dist in DISTRIBUTIONS}
    seq_len = MARKOV_LENGTH + 1
    description = "next-token prediction on two random Markov chains over digits 0-9"
    return Task("markov", description, samplers, seq_len, np.ones(seq_len - 1, dtype=bool), False)


TASK_FAMILIES = ("disjoint", "overlap-K", "shared", "markov")


def make_task(name):
    """Return the task called ``name``: one of ``disjoint``, ``overlap-0`` .. ``overlap-5``, ``shared``, ``markov``."""
    if not isinstance(name, str):
        raise TypeError(f"task name must be a string, got {name!r}")
    if name == "disjoint":
        return overlap_task(0)
    if name == "shared":
        return shared_task()
    if name == "markov":
        return markov_task()
    prefix, _, k = name.partition("-")
    if prefix == "overlap" and k.isdigit() and int(k) <= 5:
        return overlap_task(int(k))
    raise ValueError(
        f"unknown task {name!r}; choose disjoint, overlap-0 .. overlap-5, shared or markov"
    )


def sample_batch(task, dist, rng, n):
    """Draw ``n`` examples of distribution ``dist`` ("P" or "Q") as a batch dict."""
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist must be 'P' or 'Q', got {dist!r}")
    tokens = task.samplers[dist](rng, n)  # (N, seq_len)
    mask = np.broadcast_to(task.scored, (n, task.seq_len - 1))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.array(mask)}
