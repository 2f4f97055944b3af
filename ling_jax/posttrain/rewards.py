"""Verifiable rewards and Evo-CoT's reward shaping (SPEC section 11).

    R = R_correct (0/1) + R_length + R_format (-0.5 if "<think>" appears in the reply)

Length shaping over the G samples of one prompt, with l_min / l_max the group's shortest and
longest lengths:

    p(l) = 0.5 - (l - l_min) / (l_max - l_min + 1e-9)
    R_hat = p(l) if correct else min(p(l), 0);      R_length = alpha * R_hat

so among correct replies the shortest gains most, and a wrong reply is never rewarded for being
short (only penalised for being long). alpha is larger for easier tasks.
"""

from __future__ import annotations

import re

import numpy as np

THINK_PENALTY = -0.5
_LAST_INT = re.compile(r"-?\d+")


def final_integer(text: str) -> int | None:
    """The last integer in `text` (the answer a reply commits to), or None if there is none."""
    found = _LAST_INT.findall(text)
    return int(found[-1]) if found else None


def correctness(replies: list[str], answers: list[int]) -> np.ndarray:
    """1.0 where a reply's last integer equals its answer, else 0.0: [len(replies)] float32."""
    if len(replies) != len(answers):
        raise ValueError(f"{len(replies)} replies for {len(answers)} answers")
    return np.array(
        [float(final_integer(r) == a) for r, a in zip(replies, answers, strict=True)], np.float32
    )


def length_shaping(correct: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """R_hat per sample (module docstring). correct, lengths: [prompts, G] -> [prompts, G]."""
    lengths = np.asarray(lengths, np.float64)
    if lengths.ndim != 2:
        raise ValueError(f"lengths of shape {lengths.shape}: expected [prompts, G]")
    l_min = lengths.min(axis=-1, keepdims=True)
    l_max = lengths.max(axis=-1, keepdims=True)
    p = 0.5 - (lengths - l_min) / (l_max - l_min + 1e-9)
    return np.where(np.asarray(correct) > 0, p, np.minimum(p, 0.0)).astype(np.float32)


def evo_cot_rewards(
    correct: np.ndarray, lengths: np.ndarray, has_think: np.ndarray, *, alpha: float
) -> np.ndarray:
    """R = correct + alpha * R_hat + (-0.5 where has_think): [prompts, G] float32.

    correct: [prompts, G] 0/1; lengths: [prompts, G] reply tokens; has_think: [prompts, G] bool.
    """
    correct = np.asarray(correct, np.float32)
    if correct.shape != np.shape(lengths) or correct.shape != np.shape(has_think):
        raise ValueError(
            f"shapes differ: correct {correct.shape}, lengths {np.shape(lengths)}, "
            f"has_think {np.shape(has_think)}"
        )
    fmt = np.where(np.asarray(has_think, bool), THINK_PENALTY, 0.0)
    return (correct + alpha * length_shaping(correct, lengths) + fmt).astype(np.float32)
