"""``ppo``: a reinforcement-learning agent whose LSTM controller writes one policy per episode.

The controller walks the slots in graph order (as AMC and HAQ walk layers). At slot ``s`` its
input is the slot's state (:meth:`SearchSpace.features`: op type, log sizes, sensitivity,
depth, activation mean/variance/entropy, standardized over the slots) plus an embedding of the
action it took at the previous slot, so a decision can depend on what was done upstream. From
the LSTM state it emits the slot's method (method and granularity are one choice in the space)
and then the chosen method's parameters, each from its own head: choices exactly, ints and
floats as ``bins`` equal-width bins of the gene. Genes are written at bin centres, which is the
interval ``SearchSpace.decode`` reads back. The episode's only reward arrives at the end.

Reward (higher is better) of one evaluated policy::

    r = base
        - removal_penalty * (fraction of slots removed)    removal is the least reversible act
        - complexity_weight * (fraction of slots acted on) fewer steps: simpler, safer pipelines
        + diversity_weight * (mean method distance to the rest of the batch)   keeps exploring

``base`` is the search's own scalarization ``score["reward"]`` by default: ``-(accuracy_drop
+ lambda * mean(cost / original model's cost)) - 10 * constraint violation``, with the
user's ``--lambda``. When ``lam`` is given to the strategy (``--strategy-option lam=..`` or
``--tune-search``) or a score has no ``reward``, the agent scalarizes the raw objectives
itself: ``-accuracy_drop [- robustness_drop] - lam * mean(cost / reference) - 10 *
violation``, over the cost objectives asked for (latency, size, and energy when requested);
a cost's reference is ``reference[k]`` or else the first batch's median. A failed policy
scores ``failure_penalty`` below the worst reward seen.

Training is PPO (Schulman et al. 2017): advantages by GAE over the slot steps (gamma 1) on
rewards standardized by running statistics, the clipped surrogate objective, a value baseline
and an entropy bonus, ``epochs`` passes over each told batch. ``tell`` re-derives actions and
their old log-probabilities from the vectors themselves, so it accepts vectors from any source
(injected seeds, a resumed database) and needs no per-``ask`` bookkeeping.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.options import Choice, FloatRange, IntRange
from graphsurgeon.search.space import SearchSpace
from graphsurgeon.search.strategies.base import Score, Strategy

_COSTS = ("latency_ms", "size_bytes", "energy_mj")


@dataclass
class _Layout:
    """The space as index tensors: which methods and parameter bins each slot allows."""

    methods: list[str]  # global method vocabulary
    method_mask: torch.Tensor  # (S, M) bool: method allowed in slot
    local: np.ndarray  # (S, M) slot-local method index, -1 if not allowed
    keys: list[tuple[str, str]]  # global (method, param) vocabulary
    key_bins: list[int]  # head width per key
    key_method: torch.Tensor  # (K,) global method index of each key
    bin_mask: list[torch.Tensor]  # per key: (S, key_bins) bool valid bins per slot
    # per slot: (key index, gene index, n bins) of each parameter gene, by global method
    genes: list[dict[int, list[tuple[int, int, int]]]]
    slot_keys: list[list[int]]  # per slot: the keys of the methods it allows


def _layout(space: SearchSpace, bins: int) -> _Layout:
    methods: list[str] = []
    keys: list[tuple[str, str]] = []
    for slot in space.slots:
        for method, spaces in zip(slot.methods, slot.spaces, strict=True):
            if method.name not in methods:
                methods.append(method.name)
            for param in spaces:
                if (method.name, param) not in keys:
                    keys.append((method.name, param))
    n_slots = len(space.slots)
    method_mask = torch.zeros(n_slots, len(methods), dtype=torch.bool)
    local = np.full((n_slots, len(methods)), -1, dtype=np.int64)
    sizes = np.zeros((n_slots, len(keys)), dtype=np.int64)
    genes: list[dict[int, list[tuple[int, int, int]]]] = []
    for s, (slot, (start, _stop)) in enumerate(zip(space.slots, space.slot_dims, strict=True)):
        per_method: dict[int, list[tuple[int, int, int]]] = {}
        gene = start + 1
        for j, (method, spaces) in enumerate(zip(slot.methods, slot.spaces, strict=True)):
            m = methods.index(method.name)
            method_mask[s, m] = True
            local[s, m] = j
            entries = []
            for param, pspace in spaces.items():
                k = keys.index((method.name, param))
                n = len(pspace.values) if isinstance(pspace, Choice) else bins
                sizes[s, k] = n
                entries.append((k, gene, n))
                gene += 1
            per_method[m] = entries
        genes.append(per_method)
    key_bins = [max(1, int(sizes[:, k].max())) for k in range(len(keys))]
    bin_mask = [
        torch.arange(key_bins[k])[None, :] < torch.as_tensor(sizes[:, k])[:, None]
        for k in range(len(keys))
    ]
    key_method = torch.tensor([methods.index(m) for m, _ in keys], dtype=torch.long)
    slot_keys = [[k for g in per_method.values() for k, _, _ in g] for per_method in genes]
    return _Layout(
        methods, method_mask, local, keys, key_bins, key_method, bin_mask, genes, slot_keys
    )


class _Controller(nn.Module):
    """LSTM over slots; a method head, one head per (method, parameter), and a value head."""

    def __init__(self, n_features: int, layout: _Layout, hidden: int, embed: int = 16) -> None:
        super().__init__()
        n_methods = len(layout.methods)
        self.start = nn.Parameter(torch.zeros(embed))
        self.method_embed = nn.Embedding(n_methods, embed)
        self.param_embed = nn.ModuleList(nn.Embedding(n, embed) for n in layout.key_bins)
        self.cell = nn.LSTMCell(n_features + embed, hidden)
        self.method_head = nn.Linear(hidden, n_methods)
        self.param_heads = nn.ModuleList(nn.Linear(hidden, n) for n in layout.key_bins)
        self.value_head = nn.Linear(hidden, 1)
        for head in [self.method_head, *self.param_heads]:  # start near uniform: explore
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)


class _Adam:
    """Adam (Kingma and Ba 2015) written out: ``torch.optim`` imports ``torch._dynamo`` on its
    first use, seconds of start-up for a controller of a few ten thousand weights."""

    def __init__(
        self,
        params: list[nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t  # bias corrections of the zero-initialized moments
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.sub_(self.lr * (m / c1) / ((v / c2).sqrt() + self.eps))

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        for mine, saved in ((self.m, state["m"]), (self.v, state["v"])):
            for a, b in zip(mine, saved, strict=True):
                a.copy_(b)


def _number(key: str, value: Any, kind: type, low: float, high: float | None = None) -> Any:
    """A numeric strategy option, or a one-line error naming it."""
    try:
        v = kind(value)
    except (TypeError, ValueError):
        raise GraphSurgeonError(
            f"strategy ppo: --strategy-option {key}: expected {kind.__name__}, got {value!r}"
        ) from None
    if v < low or (high is not None and v > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise GraphSurgeonError(f"strategy ppo: --strategy-option {key}: {v} is not {bound}")
    return v


def _masked(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~mask, -1e9)


class PPOStrategy(Strategy):
    """PPO over an LSTM controller that emits per-slot methods and parameters."""

    name: ClassVar[str] = "ppo"
    hyperparameters: ClassVar[dict[str, FloatRange | IntRange | Choice]] = {
        "lam": FloatRange(0.01, 4.0, log=True),
        "episodes": IntRange(4, 128, log=True),
        "lr": FloatRange(3e-4, 3e-2, log=True),
        "entropy_coef": FloatRange(1e-4, 0.05, log=True),
        "clip": FloatRange(0.05, 0.4),
        "epochs": IntRange(1, 10),
        "gae_lambda": FloatRange(0.8, 1.0),
        "hidden": Choice([32, 64, 128]),
        "bins": IntRange(4, 32),
        "removal_penalty": FloatRange(0.0, 0.2),
        "complexity_weight": FloatRange(0.0, 0.05),
        "diversity_weight": FloatRange(0.0, 0.1),
    }
    defaults: ClassVar[dict[str, Any]] = {
        "lam": None,  # None: the search's reward (its --lambda)
        "episodes": 16,
        "lr": 5e-3,
        "entropy_coef": 0.01,
        "clip": 0.2,
        "epochs": 4,
        "gae_lambda": 0.95,
        "hidden": 64,
        "bins": 16,
        "removal_penalty": 0.02,
        "complexity_weight": 0.005,
        "diversity_weight": 0.02,
    }
    extra_options: ClassVar[tuple[str, ...]] = (
        "initial",
        "reference",
        "failure_penalty",
        "value_coef",
        "minibatch",
    )

    def __init__(
        self, space: SearchSpace, objectives: list[str], *, seed: int = 0, **hyper: Any
    ) -> None:
        super().__init__(space, objectives, seed=seed, **hyper)
        h = {**self.defaults, **hyper}
        self.lam = None if h["lam"] is None else _number("lam", h["lam"], float, 0.0)
        # the batch the tune loop asks for (it reads pop_size): the episodes of one PPO update
        self.pop_size = _number("episodes", h["episodes"], int, 1)
        self.lr = _number("lr", h["lr"], float, 1e-8, 1.0)
        self.entropy_coef = _number("entropy_coef", h["entropy_coef"], float, 0.0)
        self.clip = _number("clip", h["clip"], float, 1e-3, 1.0)
        self.epochs = _number("epochs", h["epochs"], int, 1)
        self.gae_lambda = _number("gae_lambda", h["gae_lambda"], float, 0.0, 1.0)
        self.bins = _number("bins", h["bins"], int, 2)
        self.removal_penalty = _number("removal_penalty", h["removal_penalty"], float, 0.0)
        self.complexity_weight = _number("complexity_weight", h["complexity_weight"], float, 0.0)
        self.diversity_weight = _number("diversity_weight", h["diversity_weight"], float, 0.0)
        self.failure_penalty = _number("failure_penalty", h.get("failure_penalty", 1.0), float, 0)
        self.value_coef = _number("value_coef", h.get("value_coef", 0.5), float, 0.0)
        self.minibatch = _number("minibatch", h.get("minibatch", 256), int, 1)
        hidden = _number("hidden", h["hidden"], int, 1)
        self.reference: dict[str, float] = {
            k: float(v) for k, v in (h.get("reference") or {}).items()
        }
        self.initial = [np.asarray(x, dtype=np.float64) for x in h.get("initial") or []]
        if not space.slots:
            raise GraphSurgeonError("ppo: the search space has no slots")
        torch.set_num_threads(1)
        self.layout = _layout(space, self.bins)
        feats = np.nan_to_num(
            np.asarray(space.features(), dtype=np.float32), posinf=0.0, neginf=0.0
        )
        feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
        self.features = torch.as_tensor(np.clip(feats, -5.0, 5.0), dtype=torch.float32)
        with torch.random.fork_rng(devices=[]):  # seed the initial weights, not the process
            torch.manual_seed(seed)
            self.net = _Controller(self.features.shape[1], self.layout, hidden)
        self.optim = _Adam(list(self.net.parameters()), lr=self.lr)
        self.gen = torch.Generator().manual_seed(seed)
        self.reward_stats = [0, 0.0, 0.0]  # Welford: count, mean, M2
        self.worst = math.inf
        self.told = 0
        self.history: list[dict[str, float]] = []  # per told batch: mean/best reward
        self.generation = 0

    # -- episodes ---------------------------------------------------------------------
    def _episodes(
        self, n: int, actions: tuple[torch.Tensor, list[torch.Tensor]] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the controller over all slots for ``n`` episodes.

        Sampling when ``actions`` is None, else teacher-forced on the given actions. Returns
        method actions (n, S), parameter actions per key (n, S), log-probabilities,
        entropies and values (each (n, S)).
        """
        lay, net = self.layout, self.net
        n_slots = len(self.space.slots)
        sample = actions is None
        m_act = torch.zeros(n, n_slots, dtype=torch.long) if sample else actions[0]
        p_act = (
            [torch.zeros(n, n_slots, dtype=torch.long) for _ in lay.keys] if sample else actions[1]
        )
        logps, ents, values = [], [], []
        state = None
        prev = net.start.expand(n, -1)
        for s in range(n_slots):
            x = torch.cat([self.features[s].expand(n, -1), prev], dim=1)
            state = net.cell(x, state)
            h = state[0]
            values.append(net.value_head(h).squeeze(1))
            logp_all = _masked(net.method_head(h), lay.method_mask[s]).log_softmax(-1)
            if sample:
                m_act[:, s] = torch.multinomial(logp_all.exp(), 1, generator=self.gen).squeeze(1)
            m = m_act[:, s]
            logp = logp_all.gather(1, m[:, None]).squeeze(1)
            ent = -(logp_all.exp() * logp_all).sum(-1)
            prev = net.method_embed(m)
            for k in lay.slot_keys[s]:
                active = m == lay.key_method[k]
                if not bool(active.any()):
                    continue
                lp = _masked(net.param_heads[k](h), lay.bin_mask[k][s]).log_softmax(-1)
                if sample:
                    p_act[k][:, s] = torch.multinomial(lp.exp(), 1, generator=self.gen).squeeze(1)
                b = p_act[k][:, s]
                w = active.float()
                logp = logp + w * lp.gather(1, b[:, None]).squeeze(1)
                ent = ent - w * (lp.exp() * lp).sum(-1)
                prev = prev + w[:, None] * net.param_embed[k](b)
            logps.append(logp)
            ents.append(ent)
        stack = torch.stack
        return m_act, p_act, stack(logps, 1), stack(ents, 1), stack(values, 1)

    def _to_vectors(self, m_act: torch.Tensor, p_act: list[torch.Tensor]) -> list[np.ndarray]:
        lay = self.layout
        out = []
        for i in range(m_act.shape[0]):
            x = np.full(self.space.dim, 0.5)
            for s, (start, _stop) in enumerate(self.space.slot_dims):
                m = int(m_act[i, s])
                n_local = len(self.space.slots[s].methods)
                x[start] = (lay.local[s, m] + 0.5) / n_local
                for k, gene, n in lay.genes[s][m]:
                    x[gene] = (int(p_act[k][i, s]) + 0.5) / n
            out.append(x)
        return out

    def _to_actions(self, xs: list[np.ndarray]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The controller actions that write ``xs`` (the inverse of :meth:`_to_vectors`)."""
        lay = self.layout
        n_slots = len(self.space.slots)
        m_act = torch.zeros(len(xs), n_slots, dtype=torch.long)
        p_act = [torch.zeros(len(xs), n_slots, dtype=torch.long) for _ in lay.keys]
        for i, x in enumerate(xs):
            x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
            for s, (start, _stop) in enumerate(self.space.slot_dims):
                n_local = len(self.space.slots[s].methods)
                j = min(int(x[start] * n_local), n_local - 1)
                m = int(np.flatnonzero(lay.local[s] == j)[0])
                m_act[i, s] = m
                for k, gene, n in lay.genes[s][m]:
                    p_act[k][i, s] = min(int(x[gene] * n), n - 1)
        return m_act, p_act

    def ask(self, n: int) -> list[np.ndarray]:
        out = [x.copy() for x in self.initial[:n]]
        self.initial = self.initial[len(out) :]
        if len(out) < n:
            with torch.no_grad():
                m_act, p_act, *_ = self._episodes(n - len(out))
            out.extend(self._to_vectors(m_act, p_act))
        return out

    # -- rewards ----------------------------------------------------------------------
    @property
    def reads_reward(self) -> bool:
        return self.lam is None  # else it scalarizes the objectives with its own lam

    def reward(self, x: np.ndarray, score: Score) -> float:
        """The scalar reward of one evaluated vector (module docstring: each term and why)."""
        if self.lam is None and "reward" in score:
            r = float(score["reward"])
        else:
            r = -float(score.get("accuracy_drop", 0.0))
            if "robustness_drop" in self.objectives:
                r -= float(score.get("robustness_drop", 0.0))
            costs = [
                float(score[k]) / max(self.reference.get(k, 1.0), 1e-12)
                for k in _COSTS
                if k in self.objectives and k in score
            ]
            lam = 1.0 if self.lam is None else self.lam
            r -= lam * (float(np.mean(costs)) if costs else 0.0)
            r -= 10.0 * float(score.get("violation", 0.0))
        policy = self.space.decode(x)
        n = max(len(policy.decisions), 1)
        removed = sum(d.method == "remove" for d in policy.decisions)
        r -= self.removal_penalty * removed / n
        r -= self.complexity_weight * len(policy.active) / n
        return r

    def _diversity(self, m_act: torch.Tensor) -> np.ndarray:
        """Mean fraction of slots on which each episode's method differs from the others'."""
        if m_act.shape[0] < 2:
            return np.zeros(m_act.shape[0])
        differ = (m_act[:, None, :] != m_act[None, :, :]).float().mean(2)
        return (differ.sum(1) / (m_act.shape[0] - 1)).numpy()

    def _standardize(self, rewards: np.ndarray) -> np.ndarray:
        count, mean, m2 = self.reward_stats
        for r in rewards:  # Welford's running mean and variance over every reward seen
            count += 1
            delta = r - mean
            mean += delta / count
            m2 += delta * (r - mean)
        self.reward_stats = [count, mean, m2]
        std = math.sqrt(m2 / count) if count > 1 else 1.0
        return (rewards - mean) / (std if std > 1e-8 else 1.0)

    def tell(self, xs: list[np.ndarray], scores: list[Score | None]) -> None:
        if len(xs) != len(scores):
            raise ValueError("tell: xs and scores differ in length")
        if not xs:
            return
        ok = [s for s in scores if s is not None]
        for k in _COSTS:  # the reference of each cost: the first batch's median
            if k not in self.reference and any(k in s for s in ok):
                self.reference[k] = float(np.median([s[k] for s in ok if k in s]))
        rewards = np.array(
            [math.nan if s is None else self.reward(x, s) for x, s in zip(xs, scores, strict=True)]
        )
        finite = rewards[np.isfinite(rewards)]
        if finite.size:
            self.worst = min(self.worst, float(finite.min()))
        floor = (self.worst if math.isfinite(self.worst) else 0.0) - self.failure_penalty
        rewards = np.where(np.isfinite(rewards), rewards, floor)
        m_act, p_act = self._to_actions(xs)
        rewards = rewards + self.diversity_weight * self._diversity(m_act)
        self.history.append({"mean": float(rewards.mean()), "best": float(rewards.max())})
        self.generation = len(self.history)  # PPO updates so far (the database's lineage)
        self.told += len(xs)
        self._update(m_act, p_act, self._standardize(rewards))

    def _update(self, m_act: torch.Tensor, p_act: list[torch.Tensor], rewards: np.ndarray) -> None:
        with torch.no_grad():
            _, _, old_logp, _, values = self._episodes(len(rewards), (m_act, p_act))
        adv = torch.zeros_like(values)  # GAE, gamma = 1, reward only at the last slot
        n_slots = values.shape[1]
        terminal = torch.as_tensor(rewards, dtype=torch.float32)
        running = torch.zeros(len(rewards))
        for s in reversed(range(n_slots)):
            nxt = terminal if s == n_slots - 1 else values[:, s + 1]
            running = (nxt - values[:, s]) + self.gae_lambda * running
            adv[:, s] = running
        returns = adv + values
        if adv.numel() > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        n = len(rewards)
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=self.gen)
            for lo in range(0, n, self.minibatch):
                idx = order[lo : lo + self.minibatch]
                acts = (m_act[idx], [p[idx] for p in p_act])
                _, _, logp, ent, v = self._episodes(len(idx), acts)
                ratio = torch.exp(logp - old_logp[idx])
                a = adv[idx]
                surrogate = torch.min(ratio * a, ratio.clamp(1 - self.clip, 1 + self.clip) * a)
                loss = (
                    -surrogate.mean()
                    + self.value_coef * (v - returns[idx]).pow(2).mean()
                    - self.entropy_coef * ent.mean()
                )
                self.optim.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.net.parameters(), 0.5)
                self.optim.step()

    # -- resume -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        buf = io.BytesIO()
        torch.save({"net": self.net.state_dict(), "optim": self.optim.state_dict()}, buf)
        return {
            **super().state_dict(),
            "layout": [self.space.dim, self.layout.methods, [list(k) for k in self.layout.keys]],
            "torch": base64.b64encode(buf.getvalue()).decode("ascii"),
            "generator": base64.b64encode(self.gen.get_state().numpy().tobytes()).decode("ascii"),
            "reward_stats": list(self.reward_stats),
            "reference": dict(self.reference),
            "worst": self.worst if math.isfinite(self.worst) else None,
            "told": self.told,
            "history": list(self.history),
            "initial": [x.tolist() for x in self.initial],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        layout = [self.space.dim, self.layout.methods, [list(k) for k in self.layout.keys]]
        if state.get("layout") != layout:
            raise GraphSurgeonError("ppo: the saved agent was trained on a different search space")
        super().load_state_dict(state)
        blob = torch.load(io.BytesIO(base64.b64decode(state["torch"])), weights_only=True)
        self.net.load_state_dict(blob["net"])
        self.optim.load_state_dict(blob["optim"])
        raw = np.frombuffer(base64.b64decode(state["generator"]), dtype=np.uint8).copy()
        self.gen.set_state(torch.from_numpy(raw))
        self.reward_stats = list(state["reward_stats"])
        self.reference = {k: float(v) for k, v in state["reference"].items()}
        self.worst = math.inf if state["worst"] is None else float(state["worst"])
        self.told = int(state["told"])
        self.history = list(state["history"])
        self.generation = len(self.history)
        self.initial = [np.asarray(x, dtype=np.float64) for x in state["initial"]]
