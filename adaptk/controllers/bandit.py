"""Bandit controllers: one arm (a draft length) per step for the whole batch (algorithms.md §8).

BanditSpec (arXiv 2505.15141) casts the choice of speculation length as a multi-armed bandit
(UCBSpec, EXP3Spec); Nightjar (arXiv 2512.22420) keeps one bandit per batch size, with ``k = 0``
among the arms. Every controller here:

* **arms**: draft lengths, default ``(0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)`` — dense where lengths
  matter most, geometric beyond; ``0`` (plain decoding) included so speculation must earn its
  keep. Each step only the arms ``<= context.k_max`` are eligible (statistics are kept for all).
  BanditSpec's released code uses ``{1..4}``: pass ``arms=(1, 2, 3, 4)`` for that.
* **one pull per step** for the whole batch: every sequence drafts that many tokens (the drafter
  may offer fewer); the arm chosen at ``decide`` is credited with the next ``update``.
* **reward** = token goodput of the step, ``Σ_i (a_i + 1) / step_time_s`` (emitted tokens per second
  of the measured draft + verify time). When the feedback carries no timing (both times 0) the
  reward is ``Σ_i (a_i + 1) / (1 + proxy_draft_cost · max_i k_i)``: emitted tokens per step over a
  crude cost proxy in units of one target pass, where every drafted token of the longest draft
  costs ``proxy_draft_cost`` (0.1) and verifying extra tokens is taken as free. Once timed steps
  have been seen, an untimed one (an engine step that also prefilled) is not credited at all.
* **online normalisation**: rewards are stored raw; at decision time they are divided by the
  running standard deviation of all rewards seen (discounted alike where the policy discounts),
  so the exploration constant ``c`` means the same for 5 tokens/s and 5000 tokens/s.
* **determinism**: randomised policies draw from ``numpy.random.default_rng(seed)``; the rng is
  part of the saved state.

river's ``bandit`` policies implement the same rules, but are not used: their state is not
JSON-serialisable through :meth:`state_dict`, they cannot restrict a pull to the arms eligible this
step (``k_max`` changes), they have no discounting, and their per-pull Python bookkeeping is
slower than these few numpy operations over the arm vector.
"""

from __future__ import annotations

import math

import numpy as np

from adaptk.core import SpeculationController
from adaptk.registry import register
from adaptk.types import Decision, Feedback, StepContext

__all__ = ["UCB", "DiscountedUCB", "Thompson", "EXP3", "ContextualBandit", "DEFAULT_ARMS", "step_reward"]

DEFAULT_ARMS: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def step_reward(feedback: Feedback, proxy_draft_cost: float = 0.1) -> float:
    """Token goodput of one step (see the module docstring for the no-timing proxy).

    >>> step_reward(Feedback(seq_ids=[1, 2], num_draft_tokens=[3, 3], num_accepted_tokens=[3, 1],
    ...                      draft_time_s=0.01, verify_time_s=0.03))
    150.0
    >>> step_reward(Feedback(seq_ids=[1], num_draft_tokens=[5], num_accepted_tokens=[4]))
    3.3333333333333335
    """
    emitted = float(feedback.num_accepted_tokens.sum()) + len(feedback.num_accepted_tokens)
    step_time = feedback.step_time_s
    if step_time > 1e-9:  # below a nanosecond a "timing" is no measurement (and would overflow)
        return emitted / step_time
    longest = float(feedback.num_draft_tokens.max()) if len(feedback.num_draft_tokens) else 0.0
    return emitted / (1.0 + proxy_draft_cost * longest)


class _BatchBandit(SpeculationController):
    """Shared machinery: arm ladder, per-(bucket, arm) discounted counts and sums, normaliser."""

    def __init__(self, arms, seed: int, proxy_draft_cost: float, discount: float, num_buckets: int = 1) -> None:
        super().__init__()
        ladder = DEFAULT_ARMS if arms is None else tuple(arms)
        if not ladder or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0 for k in ladder):
            raise ValueError(f"arms must be a non-empty sequence of non-negative ints, got {arms!r}")
        if len(set(ladder)) != len(ladder):
            raise ValueError(f"arms must be distinct, got {arms!r}")
        if not 0.0 < discount <= 1.0:
            raise ValueError(f"discount must lie in (0, 1], got {discount!r}")
        if proxy_draft_cost < 0:
            raise ValueError(f"proxy_draft_cost must be >= 0, got {proxy_draft_cost!r}")
        self._arm_values = np.asarray(sorted(ladder), dtype=np.int64)
        k = len(ladder)
        self._counts = np.zeros((num_buckets, k))
        self._sums = np.zeros((num_buckets, k))
        self._norm = np.zeros((num_buckets, 3))   # discounted [Σw, Σw·r, Σw·r²]
        self._rng = np.random.default_rng(seed)
        self._last_arm = -1
        self._last_bucket = 0
        self._timed = False  # whether any feedback carried a step time (rewards are then measured)
        self._eligible = (-1, 0)  # (k_max, how many arms are <= k_max) of the last step: a derived cache

    _TRANSIENT = ("_eligible",)

    # -- hooks -------------------------------------------------------------------------------------
    def _bucket(self, batch_size: int) -> int:
        return 0

    def _select(self, bucket: int, m: int) -> int:
        """Index of the arm to pull among the ``m`` eligible ones (the ``m`` shortest: arms are sorted)."""
        raise NotImplementedError

    def _learn(self, bucket: int, arm: int, reward: float) -> None:
        """Extra per-policy learning after the shared statistics were updated."""

    # -- helpers -----------------------------------------------------------------------------------
    def _scale(self, bucket: int) -> float:
        w, s1, s2 = self._norm[bucket]
        if w <= 0:
            return 1.0
        mean = s1 / w
        sd = math.sqrt(max(s2 / w - mean * mean, 0.0))
        if sd > 1e-9 * (abs(mean) + 1e-12) and w >= 2:
            return sd
        return abs(mean) if abs(mean) > 0 else 1.0

    def _means(self, bucket: int, m: int) -> np.ndarray:
        n = self._counts[bucket, :m]
        return np.where(n > 0, self._sums[bucket, :m] / np.maximum(n, 1e-300), 0.0)

    # -- protocol ----------------------------------------------------------------------------------
    def _decide(self, context: StepContext) -> Decision:
        n = len(context.seq_ids)
        if n == 0:
            self._last_arm = -1
            return Decision(np.zeros(0, dtype=np.int64))
        bucket = self._bucket(n)
        k_max = int(context.k_max)
        cached_k_max, m = self._eligible
        if k_max != cached_k_max:
            # arms are sorted, so the eligible ones are a prefix; none eligible: the smallest arm,
            # clipped to k_max below
            m = max(int(np.searchsorted(self._arm_values, k_max, side="right")), 1)
            self._eligible = (k_max, m)
        arm = self._select(bucket, m)
        self._last_arm, self._last_bucket = arm, bucket
        value = int(self._arm_values[arm])
        return Decision(np.full(n, min(value, k_max), dtype=np.int64), info={"arm": value, "bucket": bucket})

    def _update(self, feedback: Feedback) -> None:
        arm, bucket = self._last_arm, self._last_bucket
        if arm < 0 or not len(feedback.seq_ids):
            return
        self._last_arm = -1
        if feedback.step_time_s > 1e-9:
            self._timed = True
        elif self._timed:
            return  # untimed among timed steps (it also prefilled): a proxy reward would be in other units
        reward = step_reward(feedback, self.proxy_draft_cost)
        if self.discount < 1.0:
            self._counts[bucket] *= self.discount
            self._sums[bucket] *= self.discount
            self._norm[bucket] *= self.discount
        self._counts[bucket, arm] += 1.0
        self._sums[bucket, arm] += reward
        norm = self._norm[bucket]
        norm[0] += 1.0
        norm[1] += reward
        norm[2] += reward * reward
        self._learn(bucket, arm, reward)

    def _ucb_select(self, bucket: int, m: int) -> int:
        n = self._counts[bucket, :m]
        untried = n < 1e-9
        if untried.any():
            return int(untried.argmax())
        total = float(self._counts[bucket].sum())
        bonus = self.c * np.sqrt(math.log(max(total, math.e)) / n)
        return int(np.argmax(self._sums[bucket, :m] / n / self._scale(bucket) + bonus))


@register("ucb")
class UCB(_BatchBandit):
    """UCBSpec-style UCB over draft lengths: ``k = argmax_a mean_a/σ + c·sqrt(ln t / n_a)``.

    [code, ``sail-sg/BanditSpec``] with two deliberate changes: the bonus uses each arm's own pull
    count ``n_a`` (the released code divides by the total count, which makes the bonus equal for
    all arms — a bug), and means are divided by the running reward standard deviation ``σ``
    (module docstring) so ``c`` is scale-free; the released ``sqrt(6·ln t / n)`` corresponds to
    rewards in ``[0, 1]``. Untried eligible arms are pulled first, smallest first. ``discount < 1``
    turns it into discounted UCB (see ``discounted-ucb``).

    >>> from adaptk import StepContext
    >>> c = UCB(arms=(0, 2, 4))
    >>> c.decide(StepContext(step=0, seq_ids=[1, 2], context_lens=[5, 5], k_max=3)).num_draft_tokens
    array([0, 0])
    """

    def __init__(self, arms: tuple[int, ...] | None = None, c: float = 1.0, seed: int = 0,
                 proxy_draft_cost: float = 0.1, discount: float = 1.0) -> None:
        super().__init__(arms, seed, proxy_draft_cost, discount)
        self.arms = arms
        self.c = c
        self.seed = seed
        self.proxy_draft_cost = proxy_draft_cost
        self.discount = discount

    def _select(self, bucket: int, m: int) -> int:
        return self._ucb_select(bucket, m)

    def bonus(self, bucket: int = 0) -> np.ndarray:
        """The exploration bonus ``c·sqrt(ln t / n_a)`` of every arm now (inf for untried arms)."""
        n = self._counts[bucket]
        total = float(n.sum())
        with np.errstate(divide="ignore"):
            return np.where(n > 0, self.c * np.sqrt(math.log(max(total, math.e)) / np.maximum(n, 1e-300)), np.inf)


@register("discounted-ucb")
class DiscountedUCB(UCB):
    """Discounted UCB (Garivier & Moulines): counts, sums and the normaliser decay by ``discount``
    (0.98, an effective memory of about 50 steps) every step, so a change of the best length is
    followed: the stale arms' counts shrink, their bonus grows and they are re-tried.
    ``t`` in the bonus is the discounted total count.
    """

    def __init__(self, arms: tuple[int, ...] | None = None, c: float = 1.0, seed: int = 0,
                 proxy_draft_cost: float = 0.1, discount: float = 0.98) -> None:
        super().__init__(arms=arms, c=c, seed=seed, proxy_draft_cost=proxy_draft_cost, discount=discount)


@register("thompson")
class Thompson(_BatchBandit):
    """Gaussian Thompson sampling on normalised rewards.

    Rewards are standardised with the running mean and standard deviation (module docstring);
    each arm's normalised mean has posterior ``N(n·x̄/(n + 1), 1/(n + 1))`` (prior ``N(0, 1)``,
    unit noise), one sample per eligible arm from the seeded rng, the largest wins.
    ``discount < 1`` discounts the statistics as in ``discounted-ucb``.
    """

    def __init__(self, arms: tuple[int, ...] | None = None, seed: int = 0,
                 proxy_draft_cost: float = 0.1, discount: float = 1.0) -> None:
        super().__init__(arms, seed, proxy_draft_cost, discount)
        self.arms = arms
        self.seed = seed
        self.proxy_draft_cost = proxy_draft_cost
        self.discount = discount

    def _select(self, bucket: int, m: int) -> int:
        n = self._counts[bucket, :m]
        w, s1, _ = self._norm[bucket]
        center = s1 / w if w > 0 else 0.0
        xbar = np.where(n > 0, (self._means(bucket, m) - center) / self._scale(bucket), 0.0)
        mean = n * xbar / (n + 1.0)
        draws = mean + self._rng.standard_normal(m) / np.sqrt(n + 1.0)
        return int(np.argmax(draws))


@register("exp3")
class EXP3(_BatchBandit):
    """EXP3 (EXP3Spec's adversarial policy) over the eligible arms, with the loss-based estimate.

    Pull: ``p = (1 − γ)·softmax(log w) + γ/K`` over the ``K`` eligible arms, from the seeded rng.
    Update of the pulled arm ``a``: ``log w_a −= η·(1 − r̃)/p_a``, with the reward (token goodput,
    module docstring) mapped to ``[0, 1]`` by the running min and max of all rewards seen
    (``r̃ = 0.5`` before two distinct rewards exist). This is EXP3 with the importance-weighted
    *loss* estimate ``(1 − r̃)/p_a`` (Lattimore & Szepesvári, *Bandit Algorithms*, ch. 11), which is
    unbiased like the reward estimate ``r̃/p_a`` of Auer et al. but never pushes an arm's weight
    *up* by more than ``η``: a lucky step on a rarely pulled arm cannot take over, while a poor
    step on it costs it at once. Weights are kept as logs (shifted to max 0) so they never
    overflow. BanditSpec's released code has no EXP3 (only UCB); the abstract names EXP3Spec
    [abstract], so the update form and the defaults are ours [reconstruction].

    Defaults: ``γ = 0.02`` (2% uniform exploration keeps every arm's probability above
    ``γ/K``), ``η = 0.2``. With Auer et al.'s coupling ``η = γ/K`` (the previous form here, with
    ``γ = 0.1``) the learning rate is about 0.01 per step for 9 arms while goodputs of
    neighbouring lengths differ by about 0.1 of the reward range, so the weights needed about a
    thousand steps to separate, and 10% of steps drafted a random length meanwhile; at batch 4 on
    a drafter whose first token is accepted 4% of the time that kept a quarter of the steps
    drafting more than one token.

    >>> from adaptk import StepContext, Feedback
    >>> c = EXP3(arms=(0, 4), seed=1)
    >>> for step in range(200):   # drafting 4 costs 2x the step time and gains nothing
    ...     k = int(c.decide(StepContext(step=step, seq_ids=[1], context_lens=[5], k_max=4)).num_draft_tokens[0])
    ...     c.update(Feedback(seq_ids=[1], num_draft_tokens=[k], num_accepted_tokens=[0],
    ...                       verify_time_s=0.01 * (1 + k / 4)))
    >>> [round(float(p), 3) for p in c.probabilities(4)]
    [0.99, 0.01]
    """

    def __init__(self, arms: tuple[int, ...] | None = None, gamma: float = 0.02, eta: float = 0.2, seed: int = 0,
                 proxy_draft_cost: float = 0.1) -> None:
        super().__init__(arms, seed, proxy_draft_cost, 1.0)
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must lie in (0, 1], got {gamma!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0:
            raise ValueError(f"eta must be a number > 0, got {eta!r}")
        self.arms = arms
        self.gamma = gamma
        self.eta = eta
        self.seed = seed
        self.proxy_draft_cost = proxy_draft_cost
        self.discount = 1.0
        self._log_w = np.zeros(len(self._arm_values))
        self._range = np.array([np.inf, -np.inf])
        self._last_p = 1.0
        self._last_k = 1

    def _distribution(self, m: int) -> np.ndarray:
        logw = self._log_w[:m]
        w = np.exp(logw - logw.max())
        return (1.0 - self.gamma) / w.sum() * w + self.gamma / m

    def probabilities(self, k_max: int) -> np.ndarray:
        """The pull probabilities of the arms ``<= k_max`` now, in arm order."""
        return self._distribution(max(int(np.searchsorted(self._arm_values, k_max, side="right")), 1))

    def _select(self, bucket: int, m: int) -> int:
        p = self._distribution(m)
        cum = np.cumsum(p)
        choice = min(int(np.searchsorted(cum, self._rng.random() * cum[-1], side="right")), m - 1)
        self._last_p, self._last_k = float(p[choice]), m
        return choice

    def _learn(self, bucket: int, arm: int, reward: float) -> None:
        lo, hi = min(self._range[0], reward), max(self._range[1], reward)
        self._range = np.array([lo, hi])
        scaled = (reward - lo) / (hi - lo) if hi > lo else 0.5
        self._log_w[arm] -= self.eta * (1.0 - scaled) / self._last_p
        self._log_w -= self._log_w.max()


@register("contextual-bandit")
class ContextualBandit(_BatchBandit):
    """One UCB bandit per batch-size bucket (Nightjar's idea: the best length depends on load).

    Buckets: ``1, 2–3, 4–7, 8–15, …`` (``floor(log2 B)``), the last of ``num_buckets`` taking every
    larger batch. Each bucket has its own arm statistics and reward normaliser (goodput scales with
    the batch), arms include ``k = 0`` so a bucket can learn not to speculate. ``discount < 1``
    discounts each bucket's statistics at its own updates.
    """

    def __init__(self, arms: tuple[int, ...] | None = None, c: float = 1.0, seed: int = 0,
                 proxy_draft_cost: float = 0.1, discount: float = 1.0, num_buckets: int = 12) -> None:
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets!r}")
        super().__init__(arms, seed, proxy_draft_cost, discount, num_buckets)
        self.arms = arms
        self.c = c
        self.seed = seed
        self.proxy_draft_cost = proxy_draft_cost
        self.discount = discount
        self.num_buckets = num_buckets

    def _bucket(self, batch_size: int) -> int:
        return min(batch_size.bit_length() - 1, self.num_buckets - 1)

    def _select(self, bucket: int, m: int) -> int:
        return self._ucb_select(bucket, m)
